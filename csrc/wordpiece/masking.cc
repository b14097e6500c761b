#include "masking.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "splitmix.h"

namespace fastbert {
namespace {

enum Purpose : uint64_t { kSelect = 1, kRound = 2, kReplace = 3, kRandomId = 4 };  // as in masking.py

// The draws of one (seed, epoch, sample, purpose): uniform(position) in [0, 1).
struct Draws {
  uint64_t prefix;
  Draws(uint64_t seed, int64_t epoch, int64_t sample, uint64_t purpose)
      : prefix(mix64(mix64(mix64(seed * kGolden + purpose) ^ static_cast<uint64_t>(epoch)) ^
                     static_cast<uint64_t>(sample))) {}
  double operator()(int64_t position) const {
    return unit_interval(mix64(prefix ^ static_cast<uint64_t>(position)));
  }
};

}  // namespace

void mask_batch(const int64_t* ids, int64_t batch, int64_t seq, const int64_t* lengths, const int64_t* samples,
                const int64_t* epochs, const int64_t* caps, const uint8_t* is_special, const uint8_t* is_continuation,
                const int64_t* random_ids, int64_t num_random_ids, const MaskOptions& options, int64_t* masked,
                int64_t* labels) {
  std::vector<uint8_t> maskable(seq), selected(seq);
  std::vector<int64_t> word_start(seq), order(seq);
  std::vector<double> key(seq);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = ids + b * seq;
    const int64_t length = std::min(lengths[b], seq);
    int64_t num_maskable = 0;
    for (int64_t p = 0; p < seq; ++p) {
      maskable[p] = p < length && !is_special[row[p]];
      num_maskable += maskable[p];
    }
    // Whole-word masking: a continuation token shares the draw of the word it continues.
    int64_t start = 0;
    for (int64_t p = 0; p < seq; ++p) {
      const bool starts_word = !(options.whole_word && is_continuation[row[p]] && maskable[p]);
      if (starts_word) start = p;
      word_start[p] = start;
    }
    const Draws select(options.seed, epochs[b], samples[b], kSelect);
    for (int64_t p = 0; p < seq; ++p) {
      key[p] = maskable[p] ? select(word_start[p]) : std::numeric_limits<double>::infinity();
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return key[x] < key[y]; });
    const double want = static_cast<double>(num_maskable) * options.mlm_probability;
    const double whole = std::floor(want);
    double count = whole + (Draws(options.seed, epochs[b], samples[b], kRound)(0) < want - whole ? 1.0 : 0.0);
    const auto budget = static_cast<int64_t>(std::min(count, static_cast<double>(caps[b])));
    // The maskable positions come first in `order`; take them in draw order up to the budget.
    std::fill(selected.begin(), selected.end(), 0);
    if (options.whole_word) {
      // Whole words while the running token count stays within the budget, never a word split at its edge.
      const int64_t first_over = budget < num_maskable ? word_start[order[budget]] : -1;
      for (int64_t k = 0; k < std::min(budget, num_maskable); ++k) {
        if (word_start[order[k]] != first_over) selected[order[k]] = 1;
      }
    } else {
      for (int64_t k = 0; k < std::min(budget, num_maskable); ++k) selected[order[k]] = 1;
    }
    const Draws replace(options.seed, epochs[b], samples[b], kReplace);
    const Draws random_id(options.seed, epochs[b], samples[b], kRandomId);
    int64_t* out = masked + b * seq;
    int64_t* label = labels + b * seq;
    for (int64_t p = 0; p < seq; ++p) {
      out[p] = row[p];
      label[p] = options.ignore_index;
      if (!selected[p]) continue;
      label[p] = row[p];
      const double roll = replace(p);
      if (roll < options.mask_fraction) {
        out[p] = options.mask_id;
      } else if (roll < options.mask_fraction + options.random_fraction) {
        out[p] = random_ids[static_cast<int64_t>(random_id(p) * static_cast<double>(num_random_ids))];
      }
    }
  }
}

}  // namespace fastbert
