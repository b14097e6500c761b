// Python bindings of the fastbert._wordpiece extension.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "vocab.h"

namespace py = pybind11;

PYBIND11_MODULE(_wordpiece, m) {
  m.doc() = "fastbert's C++ WordPiece tokenizer";
  py::register_exception<fastbert::VocabError>(m, "VocabError", PyExc_ValueError);

  py::class_<fastbert::Vocab>(m, "Vocab")
      .def_static("from_file", &fastbert::Vocab::from_file, py::arg("path"),
                  "Load and validate a vocab.txt (one token per line, id = line number).")
      .def_static(
          "from_text",
          [](py::bytes text, const std::string& source) {
            return fastbert::Vocab::from_text(std::string_view(text), source);
          },
          py::arg("text"), py::arg("source") = "<memory>")
      .def("__len__", &fastbert::Vocab::size)
      .def("__contains__", [](const fastbert::Vocab& v, const std::string& t) { return v.token_to_id(t) >= 0; })
      .def(
          "token_to_id",
          [](const fastbert::Vocab& v, const std::string& t) -> py::object {
            int32_t id = v.token_to_id(t);
            return id < 0 ? py::object(py::none()) : py::object(py::int_(id));
          },
          py::arg("token"), "The id of `token`, or None when it is not in the vocabulary.")
      .def("id_to_token", &fastbert::Vocab::id_to_token, py::arg("id"))
      .def_property_readonly("tokens", &fastbert::Vocab::tokens);

  m.def(
      "find_invalid_utf8",
      [](py::bytes data) -> py::object {
        size_t at = fastbert::find_invalid_utf8(std::string_view(data));
        return at == std::string_view::npos ? py::object(py::none()) : py::object(py::int_(at));
      },
      py::arg("data"), "Byte offset of the first invalid UTF-8 sequence, or None.");
  m.attr("with_cuda") =
#ifdef FASTBERT_WITH_CUDA
      true;
#else
      false;
#endif
}
