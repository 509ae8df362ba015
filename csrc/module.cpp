// `import fastvae._C` loads this library, and loading it runs the TORCH_LIBRARY registrations.
// The module itself is empty: the ops are reached through torch.ops.fastvae, so no pybind11.
#include <Python.h>

// PyMODINIT_FUNC exports it: the library is built with hidden visibility (setup.py).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastvae operators, registered as torch.ops.fastvae.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
