// BERT's dynamic MLM masking over a padded batch, every random draw a hash of (seed, epoch, sample, position,
// purpose). The readable definition is fastbert.data.masking.MaskingCollator.mask_reference (numpy); this is the
// same computation one row at a time, and a test holds the two to identical output.
#pragma once

#include <cstdint>

namespace fastbert {

struct MaskOptions {
  uint64_t seed = 0;
  double mlm_probability = 0.15;
  double mask_fraction = 0.8;    // of the selected: replaced by [MASK]
  double random_fraction = 0.1;  // of the selected: replaced by a random ordinary token; the rest are kept
  int64_t mask_id = 0;
  bool whole_word = false;
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
