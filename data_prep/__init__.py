"""Data prep: raw chats and preference pairs -> exact, masked, packed Mixtral v1 token datasets."""

from data_prep.encode import (
    IGNORE_INDEX,
    encode_conversations,
    encode_messages,
    encode_preferences,
    normalize_turns,
)
from data_prep.formats import Preference, RecordError, detect_format, to_messages, to_preference
from data_prep.tokenizer import Tokenizer, default_tokenizer_path, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Preference",
    "RecordError",
    "Tokenizer",
    "default_tokenizer_path",
    "detect_format",
    "encode_conversations",
    "encode_messages",
    "encode_preferences",
    "load_tokenizer",
    "normalize_turns",
    "to_messages",
    "to_preference",
]
