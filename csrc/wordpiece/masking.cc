// The masker of masking.h: per row, the prediction budget, the selection (tokens, whole words or spans), then the
// 80/10/10 replacement of what was selected.
#include "masking.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "splitmix.h"

namespace fastbert {
namespace {

// As in masking.py, so that the draws of different purposes are independent.
enum Purpose : uint64_t { kSelect = 1, kRound = 2, kReplace = 3, kRandomId = 4, kSpanLength = 5, kSpanStart = 6 };

// The draws of one (seed, epoch, sample, purpose): uniform(position or draw counter) in [0, 1).
struct Draws {
  uint64_t prefix;
  Draws(uint64_t seed, int64_t epoch, int64_t sample, uint64_t purpose)
      : prefix(mix64(mix64(mix64(seed * kGolden + purpose) ^ static_cast<uint64_t>(epoch)) ^
                     static_cast<uint64_t>(sample))) {}
  double operator()(int64_t position) const {
    return unit_interval(mix64(prefix ^ static_cast<uint64_t>(position)));
  }
};

// One row's working arrays, sized once per batch and reused for every row.
struct RowScratch {
  explicit RowScratch(int64_t seq)
      : maskable(seq), selected(seq), word_start(seq), order(seq), replace_at(seq), key(seq) {}
  std::vector<uint8_t> maskable, selected;
  std::vector<int64_t> word_start, order;
  std::vector<int64_t> replace_at;  // the position whose draw decides a selected token's replacement
  std::vector<double> key;
  std::vector<int64_t> word_begin, word_end, free_words;  // spans: the row's words [begin, end), those not taken
  std::vector<uint8_t> word_taken;
};

// How many tokens the row predicts: mlm_probability of the maskable ones, stochastically rounded, at most cap.
int64_t prediction_budget(int64_t num_maskable, int64_t cap, const MaskOptions& options, const Draws& round) {
  const double want = static_cast<double>(num_maskable) * options.mlm_probability;
  const double whole = std::floor(want);
  const double count = whole + (round(0) < want - whole ? 1.0 : 0.0);
  return static_cast<int64_t>(std::min(count, static_cast<double>(cap)));
}

// Tokens (or, with whole words, each word's tokens together) in the order of one draw per token (per word), up to
// the budget; a word that would cross the budget's edge is left out whole.
void select_in_draw_order(const int64_t* row, int64_t seq, int64_t num_maskable, int64_t budget,
                          const uint8_t* is_continuation, const MaskOptions& options, const Draws& select,
                          RowScratch& s) {
  const bool whole_word = options.scheme == MaskScheme::kWholeWord;
  int64_t start = 0;
  for (int64_t p = 0; p < seq; ++p) {
    if (!(whole_word && is_continuation[row[p]] && s.maskable[p])) start = p;  // a continuation shares its word's
    s.word_start[p] = start;
  }
  for (int64_t p = 0; p < seq; ++p) {
    s.key[p] = s.maskable[p] ? select(s.word_start[p]) : std::numeric_limits<double>::infinity();
  }
  std::iota(s.order.begin(), s.order.end(), 0);
  std::stable_sort(s.order.begin(), s.order.end(), [&](int64_t x, int64_t y) { return s.key[x] < s.key[y]; });
  // The maskable positions come first in `order`.
  const int64_t first_over = whole_word && budget < num_maskable ? s.word_start[s.order[budget]] : -1;
  for (int64_t k = 0; k < std::min(budget, num_maskable); ++k) {
    if (s.word_start[s.order[k]] != first_over) s.selected[s.order[k]] = 1;
  }
}

// The row's words: runs of maskable tokens, each a token and the ## continuations right after it.
void find_words(const int64_t* row, int64_t length, const uint8_t* is_continuation, RowScratch& s) {
  s.word_begin.clear();
  s.word_end.clear();
  for (int64_t p = 0; p < length; ++p) {
    if (!s.maskable[p]) continue;
    if (!s.word_end.empty() && s.word_end.back() == p && is_continuation[row[p]]) {
      s.word_end.back() = p + 1;
    } else {
      s.word_begin.push_back(p);
      s.word_end.push_back(p + 1);
    }
  }
}

// The words span number `span` covers from its first word on: its drawn length, cut short by a taken word, a
// token that is not maskable, the row's end or the budget. Returns the word after the span.
int64_t take_span(int64_t first, int64_t length_words, int64_t budget, int64_t& covered, RowScratch& s) {
  const auto words = static_cast<int64_t>(s.word_begin.size());
  int64_t w = first;
  for (; w < words && w - first < length_words && !s.word_taken[w]; ++w) {
    if (w > first && s.word_begin[w] != s.word_end[w - 1]) break;
    const int64_t size = s.word_end[w] - s.word_begin[w];
    if (covered + size > budget) break;
    covered += size;
    s.word_taken[w] = 1;
    for (int64_t p = s.word_begin[w]; p < s.word_end[w]; ++p) {
      s.selected[p] = 1;
      s.replace_at[p] = s.word_begin[first];  // a span is replaced as a whole
    }
  }
  return w;
}

// SpanBERT: spans of whole words, each starting at a word drawn among those not yet taken, with a length drawn from
// the clipped geometric table, until the budget is spent or a span's first word would overshoot it.
void select_spans(const int64_t* row, int64_t length, int64_t budget, const uint8_t* is_continuation,
                  const MaskOptions& options, const Draws& span_start, const Draws& span_length, RowScratch& s) {
  find_words(row, length, is_continuation, s);
  s.free_words.resize(s.word_begin.size());
  std::iota(s.free_words.begin(), s.free_words.end(), 0);
  s.word_taken.assign(s.word_begin.size(), 0);
  int64_t covered = 0;
  for (int64_t span = 0; covered < budget && !s.free_words.empty(); ++span) {
    const double pick = span_start(span) * static_cast<double>(s.free_words.size());
    const int64_t first = s.free_words[static_cast<size_t>(pick)];
    const double u = span_length(span);
    int64_t length_words = 1;
    while (length_words < options.max_span_words && u >= options.span_length_cdf[length_words - 1]) ++length_words;
    if (take_span(first, length_words, budget, covered, s) == first) break;
    s.free_words.erase(std::remove_if(s.free_words.begin(), s.free_words.end(),
                                      [&](int64_t w) { return s.word_taken[w] != 0; }),
                       s.free_words.end());
  }
}

// The row's output: selected tokens become labels and are replaced 80/10/10 by the draw at their replace_at.
void replace_selected(const int64_t* row, int64_t seq, const int64_t* random_ids, int64_t num_random_ids,
                      const MaskOptions& options, const Draws& replace, const Draws& random_id,
                      const RowScratch& s, int64_t* out, int64_t* label) {
  for (int64_t p = 0; p < seq; ++p) {
    out[p] = row[p];
    label[p] = options.ignore_index;
    if (!s.selected[p]) continue;
    label[p] = row[p];
    const double roll = replace(s.replace_at[p]);
    if (roll < options.mask_fraction) {
      out[p] = options.mask_id;
    } else if (roll < options.mask_fraction + options.random_fraction) {
      out[p] = random_ids[static_cast<int64_t>(random_id(p) * static_cast<double>(num_random_ids))];
    }
  }
}

}  // namespace

void mask_batch(const int64_t* ids, int64_t batch, int64_t seq, const int64_t* lengths, const int64_t* samples,
                const int64_t* epochs, const int64_t* caps, const uint8_t* is_special, const uint8_t* is_continuation,
                const int64_t* random_ids, int64_t num_random_ids, const MaskOptions& options, int64_t* masked,
                int64_t* labels) {
  RowScratch s(seq);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = ids + b * seq;
    const int64_t length = std::min(lengths[b], seq);
    int64_t num_maskable = 0;
    for (int64_t p = 0; p < seq; ++p) {
      s.maskable[p] = p < length && !is_special[row[p]];
      num_maskable += s.maskable[p];
    }
    auto draws = [&](Purpose purpose) { return Draws(options.seed, epochs[b], samples[b], purpose); };
    const int64_t budget = prediction_budget(num_maskable, caps[b], options, draws(kRound));
    std::fill(s.selected.begin(), s.selected.end(), 0);
    std::iota(s.replace_at.begin(), s.replace_at.end(), 0);
    if (options.scheme == MaskScheme::kSpan) {
      select_spans(row, length, budget, is_continuation, options, draws(kSpanStart), draws(kSpanLength), s);
    } else {
      select_in_draw_order(row, seq, num_maskable, budget, is_continuation, options, draws(kSelect), s);
    }
    replace_selected(row, seq, random_ids, num_random_ids, options, draws(kReplace), draws(kRandomId), s,
                     masked + b * seq, labels + b * seq);
  }
}

}  // namespace fastbert
