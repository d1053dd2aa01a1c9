#pragma once
// tests/cuda_emu/runtime.h (included first) provides what this header would.
