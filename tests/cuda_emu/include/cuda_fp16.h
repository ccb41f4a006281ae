// Stand-in for CUDA's cuda_fp16.h under the CPU emulation: __half lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
