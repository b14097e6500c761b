// Python bindings of the fastbert._wordpiece extension.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <iterator>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
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
// allocation. Grown on demand, with the GIL like every call here, and never freed (ints are immutable;
// vocabularies are small). A caller keeps the returned pointer across GIL releases while another Python thread
// may grow the cache for a larger vocabulary, so growing copies the ints into a larger array and keeps the old
// array too: every pointer ever returned stays valid. Capacity doubles, so the arrays kept total less than the
// last one.
PyObject* const* shared_ints(int32_t n) {
  struct Cache {
    std::vector<std::unique_ptr<PyObject*[]>> arrays;  // every array handed out; the last is the current one
    int32_t size = 0;
    int32_t capacity = 0;
  };
  static Cache& cache = *new Cache;  // never destroyed: its ints outlive every result that shares them
  if (n > cache.capacity) {
    const auto capacity =
        static_cast<int32_t>(std::min<int64_t>(INT32_MAX, std::max<int64_t>(n, 2 * int64_t(cache.capacity))));
    std::unique_ptr<PyObject*[]> grown(new PyObject*[static_cast<size_t>(capacity)]);
    if (!cache.arrays.empty()) std::copy_n(cache.arrays.back().get(), cache.size, grown.get());
    cache.arrays.push_back(std::move(grown));
    cache.capacity = capacity;
  }
  PyObject** ints = cache.arrays.back().get();
  while (cache.size < n) {
    PyObject* value = PyLong_FromLong(static_cast<long>(cache.size));
    if (value == nullptr) throw py::error_already_set();
    ints[cache.size++] = value;
  }
  return ints;
}

// A new list of ids (each in [0, vocab_size)) made of the shared ints, or nullptr with a Python error set.
PyObject* new_id_list(const int32_t* ids, size_t count, PyObject* const* ints) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(count));
  if (list == nullptr) return nullptr;
  for (size_t k = 0; k < count; ++k) {
    Py_INCREF(ints[ids[k]]);
    PyList_SET_ITEM(list, k, ints[ids[k]]);
  }
  return list;
}

py::list id_list(const std::vector<int32_t>& ids, int32_t vocab_size) {
  PyObject* list = new_id_list(ids.data(), ids.size(), shared_ints(vocab_size));
  if (list == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(list);
}

// Pauses the cyclic GC while a batch's lists are built, since every new list would otherwise count towards a
// collection that can only find these fresh, acyclic lists; resumes it on every way out, errors included.
class GcPause {
 public:
  GcPause() : was_enabled_(PyGC_Disable()) {}
  ~GcPause() {
    if (was_enabled_) PyGC_Enable();
  }
  GcPause(const GcPause&) = delete;
  GcPause& operator=(const GcPause&) = delete;

 private:
  int was_enabled_;
};

constexpr size_t kChunk = 16;  // rows a thread claims at a time

// An exception a row's encoding threw, on whichever thread encoded it, kept for the calling thread.
struct RowFailure {
  size_t row = 0;
  std::exception_ptr error;
};

// Raises a row's failure as a Python exception naming the item (`name[row]`, and `pairs[row]` when there are
// pairs) and its size: MemoryError when an allocation failed, RuntimeError otherwise.
[[noreturn]] void raise_row_failure(const RowFailure& failure, const char* name,
                                    const std::vector<std::string_view>& texts,
                                    const std::vector<std::string_view>& pairs) {
  const std::string row = "[" + std::to_string(failure.row) + "]";
  std::string item = name + row + " (" + std::to_string(texts[failure.row].size()) + " bytes)";
  if (!pairs.empty()) item += " with pairs" + row + " (" + std::to_string(pairs[failure.row].size()) + " bytes)";
  try {
    std::rethrow_exception(failure.error);
  } catch (const std::bad_alloc&) {
    PyErr_SetString(PyExc_MemoryError, (item + ": out of memory while encoding it").c_str());
  } catch (const std::length_error&) {
    PyErr_SetString(PyExc_MemoryError, (item + ": out of memory while encoding it").c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, (item + ": " + e.what()).c_str());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, (item + ": unknown C++ exception while encoding it").c_str());
  }
  throw py::error_already_set();
}

// Runs encode_row(i) for every row i of texts (and pairs: empty, or one per text) on up to num_threads threads
// (<= 0: one per hardware thread), the calling thread among them, in chunks of kChunk rows. take_chunk(c), when
// given, runs on the calling thread with the GIL for each chunk in order as soon as it is encoded, so Python
// objects are made while the other threads still encode: the calling thread turns finished chunks into objects,
// and when the next chunk is not finished it encodes an unclaimed chunk itself (without the GIL). With
// take_chunk = nullptr the GIL is released once for the whole run. Must be called with the GIL.
//
// An exception from encode_row, on any thread, is carried back to the calling thread: the chunks before the
// failing row's are still taken, no thread claims a chunk after it, and once every thread is joined it is raised
// by raise_row_failure, so any number of threads raises what one thread would. An exception from take_chunk
// stops the threads the same way and propagates once they are joined.
template <typename EncodeRow, typename TakeChunk>
void encode_in_chunks(const std::vector<std::string_view>& texts, const std::vector<std::string_view>& pairs,
                      const char* name, int num_threads, EncodeRow&& encode_row, TakeChunk&& take_chunk) {
  constexpr bool kTakes = !std::is_same_v<std::decay_t<TakeChunk>, std::nullptr_t>;
  const size_t n = texts.size();
  const size_t chunks = (n + kChunk - 1) / kChunk;
  size_t threads = num_threads > 0 ? size_t(num_threads) : std::max(1u, std::thread::hardware_concurrency());
  threads = std::max<size_t>(1, std::min(threads, chunks));

  std::vector<RowFailure> failures(chunks);
  std::unique_ptr<std::atomic<bool>[]> done(new std::atomic<bool>[chunks]);
  for (size_t c = 0; c < chunks; ++c) done[c].store(false, std::memory_order_relaxed);
  std::atomic<size_t> next{0};
  auto encode_chunk = [&](size_t c) {
    size_t i = c * kChunk;
    try {
      for (; i < std::min(n, (c + 1) * kChunk); ++i) encode_row(i);
    } catch (...) {
      failures[c] = {i, std::current_exception()};
      next.store(chunks);  // chunks are claimed in order, so every chunk before this one is already claimed
    }
    done[c].store(true, std::memory_order_release);
  };

  // Declared after what the threads use, so it is destroyed (the threads stopped and joined) before it.
  struct Pool {
    std::atomic<size_t>& next;
    size_t chunks;
    std::vector<std::thread> threads;
    ~Pool() {
      next.store(chunks);  // on an early way out, the threads stop after their current chunk
      py::gil_scoped_release release;
      for (auto& thread : threads) thread.join();
    }
  } pool{next, chunks, {}};
  pool.threads.reserve(threads - 1);
  for (size_t k = 1; k < threads; ++k) {
    try {
      pool.threads.emplace_back([&] {
        for (size_t c; (c = next.fetch_add(1)) < chunks;) encode_chunk(c);
      });
    } catch (const std::system_error&) {
      break;  // the system refused another thread: encode on those there are
    }
  }

  std::optional<py::gil_scoped_release> released_for_the_run;
  if (!kTakes) released_for_the_run.emplace();
  for (size_t taken = 0; taken < chunks;) {
    if (!done[taken].load(std::memory_order_acquire)) {
      std::optional<py::gil_scoped_release> released;
      if (kTakes) released.emplace();
      const size_t c = next.fetch_add(1);
      if (c < chunks) {
        encode_chunk(c);
      } else {  // every chunk is claimed: the one needed next is being encoded by another thread
        while (!done[taken].load(std::memory_order_acquire)) std::this_thread::yield();
      }
      continue;
    }
    if (failures[taken].error) {
      released_for_the_run.reset();
      raise_row_failure(failures[taken], name, texts, pairs);
    }
    if constexpr (kTakes) take_chunk(taken);
    ++taken;
  }
}

// A chunk's rows back to back in one buffer (one allocation per chunk, not per row), freed once taken.
struct IdChunk {
  std::vector<int32_t> ids;
  std::vector<size_t> ends;  // row r is ids[ends[r - 1] .. ends[r]) (from 0 for r = 0)
};

// The chunked id encoder behind both the list and the flat outputs: every text's (and pair's) ids into
// chunks[c] for chunk c, on encode_in_chunks' threads, with take_chunk as there (nullptr: the GIL is released
// for the whole run).
template <typename TakeChunk>
void encode_id_chunks(const fastbert::Tokenizer& t, const std::vector<std::string_view>& texts,
                      const std::vector<std::string_view>& pairs, bool add_special_tokens, int num_threads,
                      std::vector<IdChunk>& chunks, TakeChunk&& take_chunk) {
  chunks.assign((texts.size() + kChunk - 1) / kChunk, IdChunk());
  encode_in_chunks(
      texts, pairs, "texts", num_threads,
      [&](size_t i) {
        IdChunk& chunk = chunks[i / kChunk];
        t.encode_ids(texts[i], pairs.empty() ? nullptr : &pairs[i], add_special_tokens, chunk.ids);
        chunk.ends.push_back(chunk.ids.size());
      },
      std::forward<TakeChunk>(take_chunk));
}

// Every text's (and pair's) ids as a list of lists of ints, built on the calling thread while other threads
// encode (see encode_in_chunks), with the cyclic GC paused.
py::list encode_to_lists(const fastbert::Tokenizer& t, const std::vector<std::string_view>& texts,
                         const std::vector<std::string_view>& pairs, bool add_special_tokens, int num_threads) {
  PyObject* const* ints = shared_ints(t.vocab().size());
  py::list lists(texts.size());
  const GcPause gc_pause;
  std::vector<IdChunk> chunks;
  encode_id_chunks(t, texts, pairs, add_special_tokens, num_threads, chunks, [&](size_t c) {
    const IdChunk& chunk = chunks[c];
    for (size_t r = 0, begin = 0; r < chunk.ends.size(); begin = chunk.ends[r++]) {
      PyObject* row = new_id_list(chunk.ids.data() + begin, chunk.ends[r] - begin, ints);
      if (row == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(lists.ptr(), c * kChunk + r, row);
    }
    chunks[c] = IdChunk();
  });
  return lists;
}

// Every text's ids back to back as (ids int32[N], offsets int64[len(texts) + 1]), the GIL released throughout.
py::tuple encode_to_flat(const fastbert::Tokenizer& t, const std::vector<std::string_view>& texts,
                         bool add_special_tokens, int num_threads) {
  std::vector<IdChunk> chunks;
  encode_id_chunks(t, texts, {}, add_special_tokens, num_threads, chunks, nullptr);
  const size_t n = texts.size();
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(n + 1));
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (size_t r = 0; r < chunks[c].ends.size(); ++r) {
      off[c * kChunk + r + 1] = off[c * kChunk] + static_cast<int64_t>(chunks[c].ends[r]);
    }
  }
  py::array_t<int32_t> flat(static_cast<py::ssize_t>(off[n]));
  int32_t* out = flat.mutable_data();
  {
    py::gil_scoped_release release;
    for (size_t c = 0; c < chunks.size(); ++c) {
      std::copy(chunks[c].ids.begin(), chunks[c].ids.end(), out + off[c * kChunk]);
    }
  }
  return py::make_tuple(flat, offsets);
}

// (ids, [(start, end), ...] or None) per text, without special tokens, built like encode_to_lists.
py::list encode_to_tuples(const fastbert::Tokenizer& t, const std::vector<std::string_view>& texts,
                          bool with_offsets, int num_threads, const char* name) {
  struct Chunk {
    fastbert::Encoding rows;   // the rows' ids and offsets back to back
    std::vector<size_t> ends;  // ends in rows.ids; twice that in rows.offsets
  };
  const size_t n = texts.size();
  std::vector<Chunk> out((n + kChunk - 1) / kChunk);
  PyObject* const* ints = shared_ints(t.vocab().size());
  py::list tuples(n);
  const GcPause gc_pause;
  encode_in_chunks(
      texts, {}, name, num_threads,
      [&](size_t i) {
        Chunk& chunk = out[i / kChunk];
        t.encode(texts[i], chunk.rows, with_offsets);
        chunk.ends.push_back(chunk.rows.ids.size());
      },
      [&](size_t c) {
        const Chunk& chunk = out[c];
        for (size_t r = 0, begin = 0; r < chunk.ends.size(); begin = chunk.ends[r++]) {
          py::object ids = py::reinterpret_steal<py::object>(
              new_id_list(chunk.rows.ids.data() + begin, chunk.ends[r] - begin, ints));
          if (!ids) throw py::error_already_set();
          py::object offsets = py::none();
          if (with_offsets) {
            offsets = py::list(chunk.ends[r] - begin);
            for (size_t k = begin; k < chunk.ends[r]; ++k) {
              PyObject* span = Py_BuildValue("(ii)", chunk.rows.offsets[2 * k], chunk.rows.offsets[2 * k + 1]);
              if (span == nullptr) throw py::error_already_set();
              PyList_SET_ITEM(offsets.ptr(), k - begin, span);
            }
          }
          PyObject* pair = PyTuple_Pack(2, ids.ptr(), offsets.ptr());
          if (pair == nullptr) throw py::error_already_set();
          PyList_SET_ITEM(tuples.ptr(), c * kChunk + r, pair);
        }
        out[c] = Chunk();
      });
  return tuples;
}

py::list offsets_list(const std::vector<int32_t>& flat) {
  py::list out(flat.size() / 2);
  for (size_t k = 0; k < flat.size() / 2; ++k) out[k] = py::make_tuple(flat[2 * k], flat[2 * k + 1]);
  return out;
}

// The names of a table such as kObjectiveNames, in its order, for Python.
template <typename Table>
py::tuple table_names(const Table& table) {
  py::tuple names(std::size(table));
  for (size_t i = 0; i < std::size(table); ++i) names[i] = py::str(std::string(table[i].first));
  return names;
}

// The value named `name` in such a table; an unknown name is a ValueError listing the known ones as `what`.
template <typename Table>
auto parse_name(const Table& table, const std::string& name, const char* what) {
  std::string known;
  for (const auto& [entry_name, value] : table) {
    if (name == entry_name) return value;
    known += (known.empty() ? "'" : ", '") + std::string(entry_name) + "'";
  }
  throw py::value_error(std::string(what) + " must be one of " + known + ", got '" + name + "'");
}

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A numpy copy of a vector.
template <typename T>
py::array_t<T> numpy_copy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::object vocab_token_to_id(const fastbert::Vocab& v, const std::string& token) {
  const int32_t id = v.token_to_id(token);
  return id < 0 ? py::object(py::none()) : py::object(py::int_(id));
}

py::object encode_one(const fastbert::Tokenizer& t, const py::object& text, bool with_offsets) {
  const std::string_view view = utf8_view(text.ptr(), "text");
  fastbert::Encoding enc;
  {
    py::gil_scoped_release release;
    t.encode(view, enc, with_offsets);
  }
  if (!with_offsets) return id_list(enc.ids, t.vocab().size());
  return py::make_tuple(id_list(enc.ids, t.vocab().size()), offsets_list(enc.offsets));
}

py::list encode_batch(const fastbert::Tokenizer& t, const py::sequence& texts, const py::object& pairs,
                      bool add_special_tokens, int num_threads) {
  const Utf8Batch text_batch = utf8_views(texts, "texts");
  Utf8Batch pair_batch;
  if (!pairs.is_none()) {
    pair_batch = utf8_views(pairs, "pairs");
    if (pair_batch.views.size() != text_batch.views.size()) {
      throw py::value_error("pairs has " + std::to_string(pair_batch.views.size()) + " items but texts has " +
                            std::to_string(text_batch.views.size()));
    }
  }
  return encode_to_lists(t, text_batch.views, pair_batch.views, add_special_tokens, num_threads);
}

py::tuple encode_batch_flat(const fastbert::Tokenizer& t, const py::sequence& texts, bool add_special_tokens,
                            int num_threads) {
  const Utf8Batch batch = utf8_views(texts, "texts");
  return encode_to_flat(t, batch.views, add_special_tokens, num_threads);
}

py::list encode_batch_offsets(const fastbert::Tokenizer& t, const py::sequence& texts, bool with_offsets,
                              int num_threads, const std::string& name) {
  const Utf8Batch batch = utf8_views(texts, name.c_str());
  return encode_to_tuples(t, batch.views, with_offsets, num_threads, name.c_str());
}

py::tuple split_words(const fastbert::Tokenizer& t, const py::object& text) {
  const std::string_view view = utf8_view(text.ptr(), "text");
  std::string bytes;
  std::vector<int64_t> ends;
  std::vector<int32_t> specials;
  t.split_words(view, bytes, ends, specials);
  return py::make_tuple(py::bytes(bytes), ends, specials);
}

py::tuple split_words_batch(const fastbert::Tokenizer& t, const py::sequence& texts) {
  const Utf8Batch batch = utf8_views(texts, "texts");
  std::string bytes;
  std::vector<int64_t> ends;
  std::vector<int32_t> specials;
  py::array_t<int64_t> words_per_text(static_cast<py::ssize_t>(batch.views.size()));
  {
    auto counts = words_per_text.mutable_unchecked<1>();
    py::gil_scoped_release release;
    for (size_t i = 0; i < batch.views.size(); ++i) {
      const size_t before = ends.size();
      t.split_words(batch.views[i], bytes, ends, specials);
      counts(static_cast<py::ssize_t>(i)) = static_cast<int64_t>(ends.size() - before);
    }
  }
  return py::make_tuple(py::bytes(bytes), py::array_t<int64_t>(ends.size(), ends.data()),
                        py::array_t<int32_t>(specials.size(), specials.data()), words_per_text);
}

py::tuple match_word(const fastbert::Tokenizer& t, const py::bytes& word, bool greedy) {
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
}

#ifdef FASTBERT_WITH_CUDA
py::list match_words_cuda(const fastbert::Tokenizer& t, const py::bytes& words, const std::vector<int64_t>& word_ends) {
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
}

py::tuple device_trie_match(const fastbert::DeviceTrie& trie, const py::bytes& words, const Array<int64_t>& word_ends) {
  const std::string_view w(words);
  const std::vector<int64_t> ends(word_ends.data(), word_ends.data() + word_ends.size());
  int64_t previous = 0;
  for (const int64_t end : ends) {
    if (end < previous) throw std::invalid_argument("word_ends must not decrease");
    previous = end;
  }
  if (previous != static_cast<int64_t>(w.size())) {
    throw std::invalid_argument("word_ends must end at the length of words");
  }
  std::vector<int32_t> ids, counts;
  {
    py::gil_scoped_release release;
    trie.match(w, ends, ids, counts);
  }
  return py::make_tuple(py::array_t<int32_t>(ids.size(), ids.data()),
                        py::array_t<int32_t>(counts.size(), counts.data()));
}
#endif

// The pair cutter trusts its offsets, so they are checked here: increasing, starting at 0, within what they index.
void check_offsets(const Array<int64_t>& offsets, int64_t limit, const char* what) {
  const int64_t* o = offsets.data();
  const py::ssize_t n = offsets.size();
  if (n < 1 || o[0] != 0) throw py::value_error(std::string(what) + " must start with 0");
  for (py::ssize_t k = 1; k < n; ++k) {
    if (o[k] <= o[k - 1]) {
      throw py::value_error(std::string(what) + " must increase strictly (empty items are not allowed); item " +
                            std::to_string(k - 1) + " is empty or reversed");
    }
  }
  if (o[n - 1] > limit) throw py::value_error(std::string(what) + " run past the end of what they index");
}

py::tuple segment_pairs(const Array<int32_t>& tokens, const Array<int64_t>& sentence_offsets,
                        const Array<int64_t>& doc_offsets, int64_t begin, int64_t end, int32_t seq_len,
                        const std::string& objective, double short_seq_prob, uint64_t seed) {
  fastbert::PairOptions options;
  options.seq_len = seq_len;
  options.short_seq_prob = short_seq_prob;
  options.seed = seed;
  options.objective = parse_name(fastbert::kObjectiveNames, objective, "objective");
  if (seq_len < 8) throw py::value_error("seq_len must be at least 8, got " + std::to_string(seq_len));
  check_offsets(sentence_offsets, tokens.size(), "sentence_offsets");
  check_offsets(doc_offsets, sentence_offsets.size() - 1, "doc_offsets");
  fastbert::PairOutput out;
  {
    py::gil_scoped_release release;
    fastbert::segment_pairs(tokens.data(), sentence_offsets.data(), doc_offsets.data(), doc_offsets.size() - 1,
                            begin, end, options, out);
  }
  return py::make_tuple(numpy_copy(out.tokens), numpy_copy(out.offsets), numpy_copy(out.split),
                        numpy_copy(out.labels), out.truncated_tokens, out.dropped_segments);
}

py::object find_invalid_utf8(const py::bytes& data) {
  const size_t at = fastbert::find_invalid_utf8(std::string_view(data));
  return at == std::string_view::npos ? py::object(py::none()) : py::object(py::int_(at));
}

// The masker's inputs are trusted by masking.cc, so their shapes and every id are checked here.
void check_mask_inputs(const Array<int64_t>& ids, const std::vector<const Array<int64_t>*>& per_row,
                       const Array<uint8_t>& is_special, const Array<uint8_t>& is_continuation,
                       const Array<int64_t>& random_ids, const Array<double>& span_length_cdf) {
  if (ids.ndim() != 2) throw py::value_error("ids must be [batch, seq]");
  const py::ssize_t batch = ids.shape(0), seq = ids.shape(1);
  for (const auto* a : per_row) {
    if (a->ndim() != 1 || a->shape(0) != batch) {
      throw py::value_error("lengths, samples, epochs and caps must be [batch]");
    }
  }
  const py::ssize_t vocab = is_special.size();
  if (is_continuation.size() != vocab) throw py::value_error("is_special and is_continuation differ in size");
  if (random_ids.size() == 0) throw py::value_error("random_ids is empty");
  if (span_length_cdf.ndim() != 1) throw py::value_error("span_length_cdf must be one-dimensional");
  const int64_t* row = ids.data();
  for (py::ssize_t k = 0; k < ids.size(); ++k) {
    if (row[k] < 0 || row[k] >= vocab) {
      throw py::value_error("token id " + std::to_string(row[k]) + " at row " + std::to_string(k / seq) +
                            ", position " + std::to_string(k % seq) + " is outside the vocabulary of " +
                            std::to_string(vocab));
    }
  }
}

py::tuple mask_batch(const Array<int64_t>& ids, const Array<int64_t>& lengths, const Array<int64_t>& samples,
                     const Array<int64_t>& epochs, const Array<int64_t>& caps, const Array<uint8_t>& is_special,
                     const Array<uint8_t>& is_continuation, const Array<int64_t>& random_ids, int64_t mask_id,
                     uint64_t seed, double mlm_probability, double mask_fraction, double random_fraction,
                     const std::string& scheme, const Array<double>& span_length_cdf, int64_t ignore_index) {
  check_mask_inputs(ids, {&lengths, &samples, &epochs, &caps}, is_special, is_continuation, random_ids,
                    span_length_cdf);
  fastbert::MaskOptions options;
  options.seed = seed;
  options.mlm_probability = mlm_probability;
  options.mask_fraction = mask_fraction;
  options.random_fraction = random_fraction;
  options.mask_id = mask_id;
  options.scheme = parse_name(fastbert::kMaskSchemeNames, scheme, "masking scheme");
  if (options.scheme == fastbert::MaskScheme::kSpan && span_length_cdf.size() == 0) {
    throw py::value_error("span masking needs a span_length_cdf of at least one entry");
  }
  options.span_length_cdf = span_length_cdf.data();
  options.max_span_words = span_length_cdf.size();
  options.ignore_index = ignore_index;
  const py::ssize_t batch = ids.shape(0), seq = ids.shape(1);
  py::array_t<int64_t> masked({batch, seq}), labels({batch, seq});
  int64_t* masked_data = masked.mutable_data();
  int64_t* labels_data = labels.mutable_data();
  {
    py::gil_scoped_release release;
    fastbert::mask_batch(ids.data(), batch, seq, lengths.data(), samples.data(), epochs.data(), caps.data(),
                         is_special.data(), is_continuation.data(), random_ids.data(), random_ids.size(), options,
                         masked_data, labels_data);
  }
  return py::make_tuple(masked, labels);
}

void bind_vocab(py::module_& m) {
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
      .def("token_to_id", &vocab_token_to_id, py::arg("token"),
           "The id of `token`, or None when it is not in the vocabulary.")
      .def("id_to_token", &fastbert::Vocab::id_to_token, py::arg("id"))
      .def_property_readonly("tokens", &fastbert::Vocab::tokens);
}

void bind_tokenizer(py::module_& m) {
  py::class_<fastbert::Tokenizer> tokenizer(m, "Tokenizer");
  tokenizer
      .def(py::init<fastbert::Vocab, bool, const std::vector<std::string>&, const std::string&, const std::string&,
                    const std::string&, int32_t>(),
           py::arg("vocab"), py::arg("lowercase"), py::arg("special_tokens"), py::arg("unk_token"),
           py::arg("cls_token"), py::arg("sep_token"), py::arg("max_chars_per_word") = 100)
      .def_property_readonly("vocab", &fastbert::Tokenizer::vocab, py::return_value_policy::reference_internal)
      .def_property_readonly("lowercase", &fastbert::Tokenizer::lowercase)
      .def_property_readonly("num_trie_nodes", [](const fastbert::Tokenizer& t) { return t.trie().num_nodes(); })
      .def("encode", &encode_one, py::arg("text"), py::arg("with_offsets") = false,
           "Ids of one text without [CLS]/[SEP]; with offsets, (ids, [(start, end), ...]) in characters.")
      .def("encode_batch", &encode_batch, py::arg("texts"), py::arg("pairs") = py::none(),
           py::arg("add_special_tokens") = true, py::arg("num_threads") = 0,
           "Ids of every text (and pair) on C++ threads, without the GIL.")
      .def("encode_batch_flat", &encode_batch_flat, py::arg("texts"), py::arg("add_special_tokens") = true,
           py::arg("num_threads") = 0,
           "Every text's ids back to back as (ids int32[N], offsets int64[len(texts) + 1]): text i is "
           "ids[offsets[i]:offsets[i + 1]]. No Python object per id, so nothing after the threads is serial.")
      .def("encode_batch_offsets", &encode_batch_offsets, py::arg("texts"), py::arg("with_offsets") = false,
           py::arg("num_threads") = 0, py::arg("name") = "texts",
           "(ids, offsets or None) per text, without special tokens, on C++ threads; errors call the items `name`.")
      .def("split_words", &split_words, py::arg("text"),
           "Normalized words back to back: (utf8 bytes, word end offsets, special id or -1).")
      .def("split_words_batch", &split_words_batch, py::arg("texts"),
           "split_words over many texts into one buffer: (utf8 bytes, word end offsets, special id or -1, words per "
           "text).")
      .def("match_word", &match_word, py::arg("word"), py::arg("greedy") = false,
           "Match one normalized word: (ids, token end bytes, trie steps). greedy=True runs the quadratic oracle.");
#ifdef FASTBERT_WITH_CUDA
  tokenizer.def("match_words_cuda", &match_words_cuda, py::arg("words"), py::arg("word_ends"),
                "Match words on the GPU (see split_words): ids per word.");
  py::class_<fastbert::DeviceTrie>(m, "DeviceTrie")
      .def(py::init([](const fastbert::Tokenizer& t) { return std::make_unique<fastbert::DeviceTrie>(t.trie()); }),
           py::arg("tokenizer"), py::keep_alive<1, 2>(),
           "The tokenizer's trie copied to the current CUDA device, once; match() then uploads only the words.")
      .def_property_readonly("device", &fastbert::DeviceTrie::device)
      .def("match", &device_trie_match, py::arg("words"), py::arg("word_ends"),
           "Match words on the GPU: (ids int32[len(words)], counts int32[words]); word i's counts[i] ids start at its "
           "first byte offset.");
#endif
}

void bind_data_functions(py::module_& m) {
  m.def("segment_pairs", &segment_pairs, py::arg("tokens"), py::arg("sentence_offsets"), py::arg("doc_offsets"),
        py::arg("begin"), py::arg("end"), py::arg("seq_len"), py::arg("objective"), py::arg("short_seq_prob"),
        py::arg("seed"),
        "Samples of documents [begin, end): (tokens int32, offsets int64, split int32, labels int8, truncated "
        "tokens, dropped segments); see document_pairs in tests/pairing_reference.py for the recipe.");
  m.def("mask_batch", &mask_batch, py::arg("ids"), py::arg("lengths"), py::arg("samples"), py::arg("epochs"),
        py::arg("caps"), py::arg("is_special"), py::arg("is_continuation"), py::arg("random_ids"), py::arg("mask_id"),
        py::arg("seed"), py::arg("mlm_probability"), py::arg("mask_fraction"), py::arg("random_fraction"),
        py::arg("scheme"), py::arg("span_length_cdf"), py::arg("ignore_index"),
        "BERT's dynamic masking of a padded [batch, seq] id matrix: (masked ids, labels); see "
        "fastbert.data.masking.MaskingCollator.mask_reference.");
  m.def("find_invalid_utf8", &find_invalid_utf8, py::arg("data"),
        "Byte offset of the first invalid UTF-8 sequence, or None.");
}

}  // namespace

PYBIND11_MODULE(_wordpiece, m) {
  m.doc() = "fastbert's C++ WordPiece tokenizer";
  py::register_exception<fastbert::VocabError>(m, "VocabError", PyExc_ValueError);
  bind_vocab(m);
  bind_tokenizer(m);
  bind_data_functions(m);
  m.attr("OBJECTIVES") = table_names(fastbert::kObjectiveNames);
  m.attr("MASKING_SCHEMES") = table_names(fastbert::kMaskSchemeNames);
#ifdef FASTBERT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
