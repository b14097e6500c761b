// Python bindings of the fastbert._wordpiece extension.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "masking.h"
#include "matcher.h"
#include "pairs.h"
#include "tokenizer.h"
#include "vocab.h"
#ifdef FASTBERT_WITH_CUDA
#include "cuda_matcher.h"
#endif

namespace py = pybind11;

namespace {

// The UTF-8 form of a str (CPython caches it inside the object, so the view lives as long as the str), or the
// bytes of a bytes object once checked to be UTF-8. Other types, lone surrogates and invalid UTF-8 are errors
// naming the item (`name`, or `name[index]` in a batch) and the character or byte offset.
std::string_view utf8_view(PyObject* item, const char* name, Py_ssize_t index = -1) {
  // The name is only spelled out for an error: a batch's items would otherwise each pay for a string.
  auto what = [&] { return std::string(name) + (index < 0 ? "" : "[" + std::to_string(index) + "]"); };
  if (PyBytes_Check(item)) {
    const std::string_view bytes(PyBytes_AS_STRING(item), static_cast<size_t>(PyBytes_GET_SIZE(item)));
    const size_t bad = fastbert::find_invalid_utf8(bytes);
    if (bad != std::string_view::npos) {
      throw py::value_error(what() + ": invalid UTF-8 at byte " + std::to_string(bad));
    }
    return bytes;
  }
  if (!PyUnicode_Check(item)) throw py::type_error(what() + " is " + Py_TYPE(item)->tp_name + ", not str or bytes");
  Py_ssize_t size;
  const char* data = PyUnicode_AsUTF8AndSize(item, &size);
  if (data == nullptr) {
    PyErr_Clear();
    const Py_ssize_t length = PyUnicode_GET_LENGTH(item);
    Py_ssize_t at = 0;
    while (at < length && !Py_UNICODE_IS_SURROGATE(PyUnicode_READ_CHAR(item, at))) ++at;
    char code[16];
    snprintf(code, sizeof code, "U+%04X", at < length ? unsigned(PyUnicode_READ_CHAR(item, at)) : 0u);
    throw py::value_error(what() + ": lone surrogate " + code + " at character " + std::to_string(at) +
                          " is not valid Unicode text");
  }
  return {data, static_cast<size_t>(size)};
}

// UTF-8 views of a sequence of str. `owner` is a tuple holding a reference to every item, so the views stay
// valid while the GIL is released even if another thread changes the caller's list.
struct Utf8Batch {
  py::tuple owner;
  std::vector<std::string_view> views;
};

Utf8Batch utf8_views(const py::handle& items, const char* what) {
  Utf8Batch batch;
  PyObject* tuple = PySequence_Tuple(items.ptr());
  if (tuple == nullptr) throw py::error_already_set();
  batch.owner = py::reinterpret_steal<py::tuple>(tuple);
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  batch.views.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    batch.views.push_back(utf8_view(PyTuple_GET_ITEM(tuple, i), what, i));
  }
  return batch;
}

// Python ints 0 .. n-1, made once and shared by every result: an id then costs a reference count, not an
// allocation. Grown on demand, never freed (ints are immutable; vocabularies are small).
PyObject* const* shared_ints(int32_t n) {
  static std::vector<PyObject*> ints;
  while (static_cast<int32_t>(ints.size()) < n) {
    PyObject* value = PyLong_FromLong(static_cast<long>(ints.size()));
    if (value == nullptr) throw py::error_already_set();
    ints.push_back(value);
  }
  return ints.data();
}

// A list of ids (each in [0, vocab_size)) made of the shared ints.
py::list id_list(const std::vector<int32_t>& ids, int32_t vocab_size) {
  PyObject* const* ints = shared_ints(vocab_size);
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
  if (list == nullptr) throw py::error_already_set();
  for (size_t k = 0; k < ids.size(); ++k) {
    Py_INCREF(ints[ids[k]]);
    PyList_SET_ITEM(list, k, ints[ids[k]]);
  }
  return py::reinterpret_steal<py::list>(list);
}

// Every text's (and pair's) ids as a list of lists of ints, encoded on num_threads threads. Making Python objects
// needs the GIL, so one thread must do it; rather than after the encoding, the calling thread does it while the
// others encode: it turns finished chunks of rows into lists in order, and when the next chunk is not finished
// it encodes an unclaimed chunk itself (without the GIL). The lists are built with the cyclic GC paused, since
// every new list would otherwise count towards a collection that can only find these fresh, acyclic lists.
py::list encode_to_lists(const fastbert::Tokenizer& t, const std::vector<std::string_view>& texts,
                         const std::vector<std::string_view>& pairs, bool add_special_tokens, int num_threads) {
  constexpr size_t kChunk = 16;
  const size_t n = texts.size();
  const size_t chunks = (n + kChunk - 1) / kChunk;
  size_t threads = num_threads > 0 ? size_t(num_threads) : std::max(1u, std::thread::hardware_concurrency());
  threads = std::max<size_t>(1, std::min(threads, chunks));

  // A chunk's rows back to back in one buffer (one allocation per chunk, not per row), freed once listed.
  struct Chunk {
    std::vector<int32_t> ids;
    std::vector<size_t> ends;
  };
  std::vector<Chunk> out(chunks);
  std::unique_ptr<std::atomic<bool>[]> done(new std::atomic<bool>[chunks]);
  for (size_t c = 0; c < chunks; ++c) done[c].store(false, std::memory_order_relaxed);
  std::atomic<size_t> next{0};
  auto encode_chunk = [&](size_t c) {
    Chunk& chunk = out[c];
    for (size_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
      t.encode_ids(texts[i], pairs.empty() ? nullptr : &pairs[i], add_special_tokens, chunk.ids);
      chunk.ends.push_back(chunk.ids.size());
    }
    done[c].store(true, std::memory_order_release);
  };

  PyObject* const* ints = shared_ints(t.vocab().size());
  PyObject* outer = PyList_New(static_cast<Py_ssize_t>(n));
  if (outer == nullptr) throw py::error_already_set();
  const int gc_was_enabled = PyGC_Disable();
  std::vector<std::thread> pool;
  for (size_t k = 1; k < threads; ++k) {
    pool.emplace_back([&] {
      for (size_t c; (c = next.fetch_add(1)) < chunks;) encode_chunk(c);
    });
  }
  bool failed = false;
  for (size_t built = 0; built < chunks && !failed;) {
    if (!done[built].load(std::memory_order_acquire)) {
      py::gil_scoped_release release;
      const size_t c = next.fetch_add(1);
      if (c < chunks) {
        encode_chunk(c);
      } else {  // every chunk is claimed: the one needed next is being encoded by another thread
        while (!done[built].load(std::memory_order_acquire)) std::this_thread::yield();
      }
      continue;
    }
    const Chunk& chunk = out[built];
    for (size_t r = 0, begin = 0; r < chunk.ends.size(); begin = chunk.ends[r++]) {
      PyObject* inner = PyList_New(static_cast<Py_ssize_t>(chunk.ends[r] - begin));
      if (inner == nullptr) {
        failed = true;
        break;
      }
      for (size_t k = begin; k < chunk.ends[r]; ++k) {
        PyObject* value = ints[chunk.ids[k]];
        Py_INCREF(value);
        PyList_SET_ITEM(inner, k - begin, value);
      }
      PyList_SET_ITEM(outer, built * kChunk + r, inner);
    }
    out[built] = Chunk();
    ++built;
  }
  if (failed) next.store(chunks);  // the other threads stop after their current chunk
  {
    py::gil_scoped_release release;
    for (auto& thread : pool) thread.join();
  }
  if (gc_was_enabled) PyGC_Enable();
  if (failed) {
    Py_DECREF(outer);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::list>(outer);
}

py::list offsets_list(const std::vector<int32_t>& flat) {
  py::list out(flat.size() / 2);
  for (size_t k = 0; k < flat.size() / 2; ++k) out[k] = py::make_tuple(flat[2 * k], flat[2 * k + 1]);
  return out;
}

}  // namespace

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

  py::class_<fastbert::Tokenizer>(m, "Tokenizer")
      .def(py::init<fastbert::Vocab, bool, const std::vector<std::string>&, const std::string&, const std::string&,
                    const std::string&, int32_t>(),
           py::arg("vocab"), py::arg("lowercase"), py::arg("special_tokens"), py::arg("unk_token"),
           py::arg("cls_token"), py::arg("sep_token"), py::arg("max_chars_per_word") = 100)
      .def_property_readonly("vocab", &fastbert::Tokenizer::vocab, py::return_value_policy::reference_internal)
      .def_property_readonly("lowercase", &fastbert::Tokenizer::lowercase)
      .def_property_readonly("num_trie_nodes", [](const fastbert::Tokenizer& t) { return t.trie().num_nodes(); })
      .def(
          "encode",
          [](const fastbert::Tokenizer& t, const py::object& text, bool with_offsets) -> py::object {
            const std::string_view view = utf8_view(text.ptr(), "text");
            fastbert::Encoding enc;
            {
              py::gil_scoped_release release;
              t.encode(view, enc, with_offsets);
            }
            if (!with_offsets) return id_list(enc.ids, t.vocab().size());
            return py::make_tuple(id_list(enc.ids, t.vocab().size()), offsets_list(enc.offsets));
          },
          py::arg("text"), py::arg("with_offsets") = false,
          "Ids of one text without [CLS]/[SEP]; with offsets, (ids, [(start, end), ...]) in characters.")
      .def(
          "encode_batch",
          [](const fastbert::Tokenizer& t, const py::sequence& texts, const py::object& pairs,
             bool add_special_tokens, int num_threads) {
            const Utf8Batch text_batch = utf8_views(texts, "texts");
            Utf8Batch pair_batch;
            if (!pairs.is_none()) {
              pair_batch = utf8_views(pairs, "pairs");
              if (pair_batch.views.size() != text_batch.views.size()) {
                throw py::value_error("pairs has " + std::to_string(pair_batch.views.size()) +
                                      " items but texts has " + std::to_string(text_batch.views.size()));
              }
            }
            return encode_to_lists(t, text_batch.views, pair_batch.views, add_special_tokens, num_threads);
          },
          py::arg("texts"), py::arg("pairs") = py::none(), py::arg("add_special_tokens") = true,
          py::arg("num_threads") = 0, "Ids of every text (and pair) on C++ threads, without the GIL.")
      .def(
          "encode_batch_flat",
          [](const fastbert::Tokenizer& t, const py::sequence& texts, bool add_special_tokens, int num_threads) {
            const Utf8Batch batch = utf8_views(texts, "texts");
            const size_t n = batch.views.size();
            py::array_t<int64_t> offsets(static_cast<py::ssize_t>(n + 1));
            int64_t* off = offsets.mutable_data();
            std::vector<std::vector<int32_t>> ids;
            {
              py::gil_scoped_release release;
              ids = t.encode_batch(batch.views, {}, add_special_tokens, num_threads);
              off[0] = 0;
              for (size_t i = 0; i < n; ++i) off[i + 1] = off[i] + static_cast<int64_t>(ids[i].size());
            }
            py::array_t<int32_t> flat(static_cast<py::ssize_t>(off[n]));
            int32_t* out = flat.mutable_data();
            {
              py::gil_scoped_release release;
              for (size_t i = 0; i < n; ++i) std::copy(ids[i].begin(), ids[i].end(), out + off[i]);
            }
            return py::make_tuple(flat, offsets);
          },
          py::arg("texts"), py::arg("add_special_tokens") = true, py::arg("num_threads") = 0,
          "Every text's ids back to back as (ids int32[N], offsets int64[len(texts) + 1]): text i is "
          "ids[offsets[i]:offsets[i + 1]]. No Python object per id, so nothing after the threads is serial.")
      .def(
          "encode_batch_offsets",
          [](const fastbert::Tokenizer& t, const py::sequence& texts, bool with_offsets, int num_threads,
             const std::string& name) {
            const Utf8Batch batch = utf8_views(texts, name.c_str());
            std::vector<fastbert::Encoding> encodings;
            {
              py::gil_scoped_release release;
              encodings = t.encode_batch_offsets(batch.views, with_offsets, num_threads);
            }
            py::list out(encodings.size());
            for (size_t i = 0; i < encodings.size(); ++i) {
              out[i] = py::make_tuple(id_list(encodings[i].ids, t.vocab().size()),
                                      with_offsets ? py::object(offsets_list(encodings[i].offsets)) : py::none());
            }
            return out;
          },
          py::arg("texts"), py::arg("with_offsets") = false, py::arg("num_threads") = 0, py::arg("name") = "texts",
          "(ids, offsets or None) per text, without special tokens, on C++ threads; errors call the items `name`.")
      .def(
          "split_words",
          [](const fastbert::Tokenizer& t, const py::object& text) {
            const std::string_view view = utf8_view(text.ptr(), "text");
            std::string bytes;
            std::vector<int64_t> ends;
            std::vector<int32_t> specials;
            t.split_words(view, bytes, ends, specials);
            return py::make_tuple(py::bytes(bytes), ends, specials);
          },
          py::arg("text"), "Normalized words back to back: (utf8 bytes, word end offsets, special id or -1).")
      .def(
          "match_word",
          [](const fastbert::Tokenizer& t, const py::bytes& word, bool greedy) {
            const std::string_view w(word);
            const auto* p = reinterpret_cast<const uint8_t*>(w.data());
            const auto len = static_cast<int32_t>(w.size());
            std::vector<int32_t> ids(std::max<size_t>(1, w.size())), ends(ids.size());
            int64_t steps = 0;
            const int32_t n = greedy ? fastbert::match_word_greedy(t.trie().view(), p, len, ids.data(), ends.data())
                                     : fastbert::match_word(t.trie().view(), p, len, ids.data(), ends.data(), &steps);
            ids.resize(n);
            ends.resize(n);
            return py::make_tuple(ids, ends, steps);
          },
          py::arg("word"), py::arg("greedy") = false,
          "Match one normalized word: (ids, token end bytes, trie steps). greedy=True runs the quadratic oracle.")
#ifdef FASTBERT_WITH_CUDA
      .def(
          "match_words_cuda",
          [](const fastbert::Tokenizer& t, const py::bytes& words, const std::vector<int64_t>& word_ends) {
            const std::string_view w(words);
            std::vector<int32_t> ids, counts;
            {
              py::gil_scoped_release release;
              fastbert::match_words_cuda(t.trie(), w, word_ends, ids, counts);
            }
            py::list out(counts.size());
            int64_t begin = 0;
            for (size_t i = 0; i < counts.size(); ++i) {
              out[i] = std::vector<int32_t>(ids.begin() + begin, ids.begin() + begin + counts[i]);
              begin = word_ends[i];
            }
            return out;
          },
          py::arg("words"), py::arg("word_ends"), "Match words on the GPU (see split_words): ids per word.")
#endif
      ;

  m.def(
      "segment_pairs",
      [](const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& tokens,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& sentence_offsets,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& doc_offsets, int64_t begin,
         int64_t end, int32_t seq_len, const std::string& objective, double short_seq_prob, uint64_t seed) {
        fastbert::PairOptions options;
        options.seq_len = seq_len;
        options.short_seq_prob = short_seq_prob;
        options.seed = seed;
        if (objective == "none") {
          options.objective = fastbert::Objective::kNone;
        } else if (objective == "nsp") {
          options.objective = fastbert::Objective::kNsp;
        } else if (objective == "sop") {
          options.objective = fastbert::Objective::kSop;
        } else {
          throw py::value_error("objective must be 'nsp', 'sop' or 'none', got '" + objective + "'");
        }
        if (seq_len < 8) throw py::value_error("seq_len must be at least 8, got " + std::to_string(seq_len));
        // The offsets are trusted below, so check them here: increasing, starting at 0, within what they index.
        auto check = [](const int64_t* offsets, py::ssize_t n, int64_t limit, const char* what) {
          if (n < 1 || offsets[0] != 0) throw py::value_error(std::string(what) + " must start with 0");
          for (py::ssize_t k = 1; k < n; ++k) {
            if (offsets[k] <= offsets[k - 1]) {
              throw py::value_error(std::string(what) + " must increase strictly (empty items are not allowed); "
                                    "item " + std::to_string(k - 1) + " is empty or reversed");
            }
          }
          if (offsets[n - 1] > limit) throw py::value_error(std::string(what) + " run past the end of what they index");
        };
        check(sentence_offsets.data(), sentence_offsets.size(), tokens.size(), "sentence_offsets");
        check(doc_offsets.data(), doc_offsets.size(), sentence_offsets.size() - 1, "doc_offsets");
        fastbert::PairOutput out;
        {
          py::gil_scoped_release release;
          fastbert::segment_pairs(tokens.data(), sentence_offsets.data(), doc_offsets.data(), doc_offsets.size() - 1,
                                  begin, end, options, out);
        }
        auto array = [](const auto& v) {
          using T = typename std::decay_t<decltype(v)>::value_type;
          py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
          std::copy(v.begin(), v.end(), a.mutable_data());
          return a;
        };
        return py::make_tuple(array(out.tokens), array(out.offsets), array(out.split), array(out.labels),
                              out.truncated_tokens, out.dropped_segments);
      },
      py::arg("tokens"), py::arg("sentence_offsets"), py::arg("doc_offsets"), py::arg("begin"), py::arg("end"),
      py::arg("seq_len"), py::arg("objective"), py::arg("short_seq_prob"), py::arg("seed"),
      "Samples of documents [begin, end): (tokens int32, offsets int64, split int32, labels int8, truncated "
      "tokens, dropped segments); see fastbert.data.prepare.document_pairs for the recipe.");
  m.def(
      "mask_batch",
      [](const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& samples,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& epochs,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& caps,
         const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& is_special,
         const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& is_continuation,
         const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& random_ids, int64_t mask_id,
         uint64_t seed, double mlm_probability, double mask_fraction, double random_fraction, bool whole_word,
         int64_t ignore_index) {
        if (ids.ndim() != 2) throw py::value_error("ids must be [batch, seq]");
        const py::ssize_t batch = ids.shape(0), seq = ids.shape(1);
        for (const auto* a : {&lengths, &samples, &epochs, &caps}) {
          if (a->ndim() != 1 || a->shape(0) != batch) {
            throw py::value_error("lengths, samples, epochs and caps must be [batch]");
          }
        }
        const py::ssize_t vocab = is_special.size();
        if (is_continuation.size() != vocab) throw py::value_error("is_special and is_continuation differ in size");
        if (random_ids.size() == 0) throw py::value_error("random_ids is empty");
        const int64_t* row = ids.data();
        for (py::ssize_t k = 0; k < ids.size(); ++k) {
          if (row[k] < 0 || row[k] >= vocab) {
            throw py::value_error("token id " + std::to_string(row[k]) + " at row " + std::to_string(k / seq) +
                                  ", position " + std::to_string(k % seq) + " is outside the vocabulary of " +
                                  std::to_string(vocab));
          }
        }
        fastbert::MaskOptions options;
        options.seed = seed;
        options.mlm_probability = mlm_probability;
        options.mask_fraction = mask_fraction;
        options.random_fraction = random_fraction;
        options.mask_id = mask_id;
        options.whole_word = whole_word;
        options.ignore_index = ignore_index;
        py::array_t<int64_t> masked({batch, seq}), labels({batch, seq});
        int64_t* masked_data = masked.mutable_data();
        int64_t* labels_data = labels.mutable_data();
        {
          py::gil_scoped_release release;
          fastbert::mask_batch(ids.data(), batch, seq, lengths.data(), samples.data(), epochs.data(), caps.data(),
                               is_special.data(), is_continuation.data(), random_ids.data(), random_ids.size(),
                               options, masked_data, labels_data);
        }
        return py::make_tuple(masked, labels);
      },
      py::arg("ids"), py::arg("lengths"), py::arg("samples"), py::arg("epochs"), py::arg("caps"),
      py::arg("is_special"), py::arg("is_continuation"), py::arg("random_ids"), py::arg("mask_id"), py::arg("seed"),
      py::arg("mlm_probability"), py::arg("mask_fraction"), py::arg("random_fraction"), py::arg("whole_word"),
      py::arg("ignore_index"),
      "BERT's dynamic masking of a padded [batch, seq] id matrix: (masked ids, labels); see "
      "fastbert.data.masking.MaskingCollator.mask_reference.");
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
