// BERT's pretraining samples cut from tokenized documents: segment pairs for NSP or SOP as in the original recipe,
// or whole sentences packed up to the length (RoBERTa-style) when there is no sentence objective.
//
// The readable definition is document_pairs in tests/pairing_reference.py (Python); this is the same algorithm
// over flat arrays, with the same random stream per document, and a test holds the two to identical output.
#pragma once

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

namespace fastbert {

enum class Objective : int { kNone = 0, kNsp = 1, kSop = 2 };

// Each objective's name, in the order of fastbert.config.OBJECTIVES: the binding parses names with this table and
// exposes it as fastbert._wordpiece.OBJECTIVES, and a test holds that tuple equal to the Python one.
inline constexpr std::pair<std::string_view, Objective> kObjectiveNames[] = {
    {"nsp", Objective::kNsp}, {"sop", Objective::kSop}, {"none", Objective::kNone}};

struct PairOptions {
  int32_t seq_len = 128;  // including [CLS] and [SEP]s, which are not stored
  Objective objective = Objective::kNsp;
  double short_seq_prob = 0.1;
  uint64_t seed = 0;
};

// Samples as the shard format stores them: segment A then B back to back in `tokens`, sample i at
// [offsets[i], offsets[i + 1]), its first split[i] tokens being A; labels 1 (IsNext / in order), 0 (NotNext /
// swapped) or -1 (no sentence objective).
struct PairOutput {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> split;
  std::vector<int8_t> labels;
  int64_t truncated_tokens = 0;
  int64_t dropped_segments = 0;
};

// A document stream's random numbers: SplitMix64 seeded from (seed, document index), so a document's samples do
// not depend on which process or block cuts them.
class PairRandom {
 public:
  PairRandom(uint64_t seed, uint64_t stream);
  double uniform();                        // [0, 1), 53 bits
  int64_t randint(int64_t low, int64_t high);  // [low, high), from one uniform draw

 private:
  uint64_t state_;
};

// Appends the samples of documents [begin, end) to `out`. Sentence s is tokens[sentence_offsets[s],
// sentence_offsets[s + 1]); document d is sentences [doc_offsets[d], doc_offsets[d + 1]). Sentences and documents
// are non-empty. NSP negatives are drawn from any of the num_docs documents. Throws std::invalid_argument on
// inconsistent input.
void segment_pairs(const int32_t* tokens, const int64_t* sentence_offsets, const int64_t* doc_offsets, int64_t num_docs,
                   int64_t begin, int64_t end, const PairOptions& options, PairOutput& out);

}  // namespace fastbert
