// Vocab loading and validation; see vocab.h.
#include "vocab.h"

#include <fstream>
#include <sstream>

namespace fastbert {

size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr uint32_t kMinForLength[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLength[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

static bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'; }

Vocab Vocab::from_text(std::string_view text, const std::string& source) {
  Vocab vocab;
  size_t pos = 0;
  size_t line_no = 0;
  auto fail = [&](const std::string& what) -> VocabError {
    std::ostringstream msg;
    msg << source << ":" << line_no << ": " << what;
    return VocabError(msg.str());
  };
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") pos = 3;  // a UTF-8 byte order mark is not a token
  while (pos < text.size()) {
    ++line_no;
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view token = text.substr(pos, end - pos);
    pos = end + 1;
    if (!token.empty() && token.back() == '\r') token.remove_suffix(1);
    if (token.empty()) throw fail("empty line (every line of a vocab.txt must hold one token)");
    const size_t bad = find_invalid_utf8(token);
    if (bad != std::string_view::npos) {
      std::ostringstream what;
      what << "invalid UTF-8 at byte " << bad << " of the token";
      throw fail(what.str());
    }
    if (is_ascii_space(token.front()) || is_ascii_space(token.back())) {
      throw fail("token '" + std::string(token) + "' has leading or trailing whitespace");
    }
    vocab.tokens_.emplace_back(token);
  }
  if (vocab.tokens_.empty()) throw VocabError(source + ": the vocabulary is empty");
  if (vocab.tokens_.size() > static_cast<size_t>(INT32_MAX)) throw VocabError(source + ": too many tokens");
  vocab.ids_.reserve(vocab.tokens_.size());
  for (size_t i = 0; i < vocab.tokens_.size(); ++i) {
    auto [it, inserted] = vocab.ids_.emplace(vocab.tokens_[i], static_cast<int32_t>(i));
    if (!inserted) {
      line_no = i + 1;
      std::ostringstream what;
      what << "duplicate token '" << vocab.tokens_[i] << "' (first on line " << it->second + 1 << ")";
      throw fail(what.str());
    }
  }
  return vocab;
}

Vocab Vocab::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw VocabError(path + ": cannot open vocabulary file");
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) throw VocabError(path + ": read error");
  return from_text(buf.str(), path);
}

Vocab::Vocab(const Vocab& other) : tokens_(other.tokens_) { index(); }

Vocab& Vocab::operator=(const Vocab& other) {
  if (this != &other) {
    tokens_ = other.tokens_;
    index();
  }
  return *this;
}

void Vocab::index() {
  ids_.clear();
  ids_.reserve(tokens_.size());
  for (size_t i = 0; i < tokens_.size(); ++i) ids_.emplace(tokens_[i], static_cast<int32_t>(i));
}

int32_t Vocab::token_to_id(std::string_view token) const {
  auto it = ids_.find(token);
  return it == ids_.end() ? -1 : it->second;
}

const std::string& Vocab::id_to_token(int32_t id) const {
  if (id < 0 || id >= size()) {
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                            std::to_string(size()) + ")");
  }
  return tokens_[static_cast<size_t>(id)];
}

}  // namespace fastbert
