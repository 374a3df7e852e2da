import hashlib
import unicodedata

from warehouse.keys import doc_hash, fingerprint, model_key, slug


def test_doc_hash_is_sha256_of_nfc_text():
    text = "Cafe\u0301 au lait"
    expected = hashlib.sha256(unicodedata.normalize("NFC", text).encode()).hexdigest()
    assert doc_hash(text) == expected
    assert doc_hash("caf\u00e9") == doc_hash("cafe\u0301")


def test_doc_hash_keeps_case_and_whitespace():
    assert doc_hash("Hello") != doc_hash("hello")
    assert doc_hash("a b") != doc_hash("a  b")
    assert doc_hash("text") != doc_hash("text\n")


def test_fingerprint_is_order_independent_and_type_tagged():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": "1"})
    assert fingerprint({"a": 1}) != fingerprint({"a": True})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.0})


def test_model_key_is_a_slug_and_a_short_fingerprint():
    fp = fingerprint({"weights": "x"})
    key = model_key("sentence-transformers/all-MiniLM-L6-v2", fp)
    assert key == f"all-minilm-l6-v2-{fp[:12]}"
    assert slug("/tmp/My Model/") == "my-model"
