// BERT's dynamic MLM masking over a padded batch, every random draw a hash of (seed, epoch, sample, position or draw
// counter, purpose). The readable definition is fastbert.data.masking.MaskingCollator.mask_reference (numpy and,
// for spans, a plain loop); this is the same computation one row at a time, and a test holds the two to identical
// output.
#pragma once

#include <cstdint>
#include <string_view>
#include <utility>

namespace fastbert {

// What is selected for prediction: single tokens (BERT), whole words (a token and its ## continuations), or
// SpanBERT's spans of whole words with geometric lengths.
enum class MaskScheme { kToken, kWholeWord, kSpan };

// Each scheme's name, in the order of fastbert.data.masking.MASKING_SCHEMES: the binding parses names with this
// table and exposes it as fastbert._wordpiece.MASKING_SCHEMES, and a test holds the two equal.
inline constexpr std::pair<std::string_view, MaskScheme> kMaskSchemeNames[] = {
    {"token", MaskScheme::kToken}, {"whole-word", MaskScheme::kWholeWord}, {"span", MaskScheme::kSpan}};

struct MaskOptions {
  uint64_t seed = 0;
  double mlm_probability = 0.15;
  double mask_fraction = 0.8;    // of the selected: replaced by [MASK]
  double random_fraction = 0.1;  // of the selected: replaced by a random ordinary token; the rest are kept
  int64_t mask_id = 0;
  MaskScheme scheme = MaskScheme::kToken;
  // kSpan: span_length_cdf[k] = P(length <= k + 1 words) for k < max_span_words; the longest span is
  // max_span_words words. The table is the Python side's (one definition of the distribution).
  const double* span_length_cdf = nullptr;
  int64_t max_span_words = 0;
  int64_t ignore_index = -100;
};

// ids, masked and labels are [batch, seq] row-major; lengths, samples, epochs and caps (the most predictions per
// row) are [batch]. is_special and is_continuation are indexed by token id (vocab_size entries); random_ids are the
// tokens a random replacement draws from. Ids must be in [0, vocab_size).
void mask_batch(const int64_t* ids, int64_t batch, int64_t seq, const int64_t* lengths, const int64_t* samples,
                const int64_t* epochs, const int64_t* caps, const uint8_t* is_special, const uint8_t* is_continuation,
                const int64_t* random_ids, int64_t num_random_ids, const MaskOptions& options, int64_t* masked,
                int64_t* labels);

}  // namespace fastbert
