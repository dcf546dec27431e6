"""Build targets of the TileLang kernels. Every builder takes `target`: None builds for the GPU this
process sees ("auto"); SM90 builds for sm_90a explicitly, codegen and nvcc only, so kernels also
build on a machine without a GPU (the CI's compile checks)."""

SM90 = "sm90"
TARGETS = {SM90: {"kind": "cuda", "arch": "sm_90a"}, None: "auto"}
