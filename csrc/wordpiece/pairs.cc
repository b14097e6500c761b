#include "pairs.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include "splitmix.h"

namespace fastbert {
namespace {

struct Span {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

// BERT's truncation: trim the longer segment (B on a tie) one token at a time, from the front or the back at random.
int64_t truncate_pair(std::vector<int32_t>& a, std::vector<int32_t>& b, int64_t limit, PairRandom& rng) {
  const int64_t excess = static_cast<int64_t>(a.size() + b.size()) - limit;
  if (excess <= 0) return 0;
  int64_t a0 = 0, a1 = static_cast<int64_t>(a.size()), b0 = 0, b1 = static_cast<int64_t>(b.size());
  for (int64_t k = 0; k < excess; ++k) {
    const bool front = rng.uniform() < 0.5;
    if (a1 - a0 > b1 - b0) {
      front ? ++a0 : --a1;
    } else {
      front ? ++b0 : --b1;
    }
  }
  a = std::vector<int32_t>(a.begin() + a0, a.begin() + a1);
  b = std::vector<int32_t>(b.begin() + b0, b.begin() + b1);
  return excess;
}

void emit(const int32_t* a, size_t a_len, const int32_t* b, size_t b_len, int8_t label, PairOutput& out) {
  out.tokens.insert(out.tokens.end(), a, a + a_len);
  out.tokens.insert(out.tokens.end(), b, b + b_len);
  out.offsets.push_back(static_cast<int64_t>(out.tokens.size()));
  out.split.push_back(static_cast<int32_t>(a_len));
  out.labels.push_back(label);
}

// Whole sentences packed up to `limit` tokens; a sentence longer than that spans several samples.
void packed(const int32_t* tokens, const std::vector<Span>& doc, int64_t limit, PairOutput& out) {
  std::vector<int32_t> current;
  for (const Span& s : doc) {
    if (!current.empty() && static_cast<int64_t>(current.size()) + s.size() > limit) {
      emit(current.data(), current.size(), nullptr, 0, -1, out);
      current.clear();
    }
    current.insert(current.end(), tokens + s.begin, tokens + s.end);
    size_t start = 0;
    while (static_cast<int64_t>(current.size() - start) > limit) {
      emit(current.data() + start, static_cast<size_t>(limit), nullptr, 0, -1, out);
      start += static_cast<size_t>(limit);
    }
    current.erase(current.begin(), current.begin() + static_cast<std::ptrdiff_t>(start));
  }
  if (!current.empty()) emit(current.data(), current.size(), nullptr, 0, -1, out);
}

// Appends the tokens of spans[first, last) to `out`.
void append(std::vector<int32_t>& out, const int32_t* tokens, const std::vector<Span>& spans, size_t first,
            size_t last) {
  for (size_t k = first; k < last; ++k) out.insert(out.end(), tokens + spans[k].begin, tokens + spans[k].end);
}

}  // namespace

PairRandom::PairRandom(uint64_t seed, uint64_t stream) : state_(mix64(mix64(seed + kGolden) ^ stream)) {}

double PairRandom::uniform() {
  state_ += kGolden;
  return unit_interval(mix64(state_));
}

int64_t PairRandom::randint(int64_t low, int64_t high) {
  return low + static_cast<int64_t>(uniform() * static_cast<double>(high - low));
}

void segment_pairs(const int32_t* tokens, const int64_t* sentence_offsets, const int64_t* doc_offsets, int64_t num_docs,
                   int64_t begin, int64_t end, const PairOptions& options, PairOutput& out) {
  if (begin < 0 || end > num_docs || begin > end) {
    throw std::invalid_argument("documents [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") are not within the " + std::to_string(num_docs) + " documents");
  }
  if (options.objective == Objective::kNsp && num_docs < 2) {
    throw std::invalid_argument("NSP needs at least two documents to draw negatives from");
  }
  const int64_t max_tokens = options.seq_len - 3;
  const int64_t piece = std::max<int64_t>(1, max_tokens / 2);
  auto sentences_of = [&](int64_t d) {
    std::vector<Span> spans;
    for (int64_t s = doc_offsets[d]; s < doc_offsets[d + 1]; ++s) {
      spans.push_back({sentence_offsets[s], sentence_offsets[s + 1]});
    }
    return spans;
  };
  std::vector<int32_t> a, b;
  for (int64_t index = begin; index < end; ++index) {
    PairRandom rng(options.seed, static_cast<uint64_t>(index));
    std::vector<Span> doc = sentences_of(index);
    if (options.objective == Objective::kNone) {
      packed(tokens, doc, options.seq_len - 2, out);
      continue;
    }
    // A "sentence" too long for half a sample is cut into pieces that fit, rather than left to truncation.
    if (std::any_of(doc.begin(), doc.end(), [&](const Span& s) { return s.size() > piece; })) {
      std::vector<Span> pieces;
      for (const Span& s : doc) {
        for (int64_t k = s.begin; k < s.end; k += piece) pieces.push_back({k, std::min(s.end, k + piece)});
      }
      doc = std::move(pieces);
    }
    auto draw_target = [&] {
      return rng.uniform() < options.short_seq_prob ? rng.randint(2, max_tokens + 1) : max_tokens;
    };
    const int64_t n = static_cast<int64_t>(doc.size());
    int64_t target = draw_target(), length = 0;
    size_t chunk_begin = 0;  // the chunk is doc[chunk_begin, i]
    for (int64_t i = 0; i < n; ++i) {
      length += doc[i].size();
      if (i != n - 1 && length < target) continue;
      const size_t chunk_size = static_cast<size_t>(i + 1) - chunk_begin;
      const size_t a_end = chunk_size >= 2 ? static_cast<size_t>(rng.randint(1, static_cast<int64_t>(chunk_size))) : 1;
      a.clear();
      b.clear();
      append(a, tokens, doc, chunk_begin, chunk_begin + a_end);
      int8_t label;
      if (options.objective == Objective::kNsp && rng.uniform() < 0.5) {
        label = 0;
        int64_t other = rng.randint(0, num_docs - 1);
        other += other >= index;
        const int64_t first = doc_offsets[other], count = doc_offsets[other + 1] - first;
        const int64_t start = rng.randint(0, count);
        for (int64_t s = first + start; s < first + count; ++s) {
          b.insert(b.end(), tokens + sentence_offsets[s], tokens + sentence_offsets[s + 1]);
          if (static_cast<int64_t>(b.size()) >= target - static_cast<int64_t>(a.size())) break;
        }
        i -= static_cast<int64_t>(chunk_size - a_end);  // the unused sentences start the next sample
      } else {
        append(b, tokens, doc, chunk_begin + a_end, chunk_begin + chunk_size);
        if (b.empty() && a.size() >= 2) {  // one sentence: split it so that it still makes an A/B pair
          const auto cut = static_cast<std::ptrdiff_t>(rng.randint(1, static_cast<int64_t>(a.size())));
          b.assign(a.begin() + cut, a.end());
          a.resize(static_cast<size_t>(cut));
        }
        label = 1;
        if (options.objective == Objective::kSop && rng.uniform() < 0.5) {
          std::swap(a, b);
          label = 0;
        }
      }
      out.truncated_tokens += truncate_pair(a, b, max_tokens, rng);
      if (!a.empty() && !b.empty()) {
        emit(a.data(), a.size(), b.data(), b.size(), label, out);
      } else {
        ++out.dropped_segments;
      }
      target = draw_target();
      length = 0;
      chunk_begin = static_cast<size_t>(i + 1);
    }
  }
}

}  // namespace fastbert
