"""`memfast info`: build information and the backend in use."""
import json


def add_arguments(parser):
    pass


def run(args):
    import torch

    import memfast

    cuda = torch.cuda.is_available()
    info = {"memfast": memfast.__version__, "torch_runtime": torch.__version__, "backend": memfast.get_backend("cpu"),
            "backend_cuda": memfast.get_backend("cuda") if cuda else None, "build": memfast.build_info(),
            "cuda_available": cuda}
    print(json.dumps(info, indent=2))
    return 0
