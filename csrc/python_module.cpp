// Makes _C an importable Python module. The ops register themselves through the dispatcher when the library loads;
// the module itself exposes nothing. (Not part of the CMake library, which has no Python dependency.)
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
