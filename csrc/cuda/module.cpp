// The Python module fastmtl._C_cuda: importing it runs the CUDA registrations of csrc/cuda/*_aten.cpp.
// The schemas live in fastmtl._C, which must be imported first (fastmtl/_native.py does).

#include <Python.h>

static struct PyModuleDef fastmtl_C_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&fastmtl_C_cuda_module); }
