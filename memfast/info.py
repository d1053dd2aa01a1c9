"""`memfast info`: build information and the backend in use."""
import json


def add_arguments(parser):
    pass


def run(args):
    import torch

    import memfast

    info = {"memfast": memfast.__version__, "torch_runtime": torch.__version__, "backend": memfast.get_backend(),
            "build": memfast.build_info(), "cuda_available": torch.cuda.is_available()}
    print(json.dumps(info, indent=2))
    return 0
