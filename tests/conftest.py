import json
import shutil
from pathlib import Path

import pytest

TINY_WORDS = "the a of and to is in for with on game data library tool python text model file warehouse layer".split()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 32) with a WordPiece fast tokenizer, in Hugging Face format."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)


@pytest.fixture(scope="session")
def tiny_bert_6_layers(tmp_path_factory) -> Path:
    """The same tiny BERT with 6 layers, as MiniLM has (the README's recipes read layer 6)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-6"), layers=6)


def make_tiny_bert(path: Path, *, layers: int) -> Path:
    """A random BERT of ``layers`` layers (hidden 32) with a WordPiece fast tokenizer, saved at ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    tokens = dict.fromkeys(specials + TINY_WORDS + letters + ["##" + c for c in letters])  # unique, in order
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.decoder = decoders.WordPiece()

    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=64, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    ).save_pretrained(path)
    (path / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_bert_dir) -> Path:
    """tiny_bert_dir exported to ONNX (mean pooling, max_length 16): an artifact directory for Encoder.load."""
    from pipelines.export import export_model
    from pipelines.models import resolve_model

    dest = tmp_path_factory.mktemp("artifacts") / "tiny"
    return export_model(resolve_model(str(tiny_bert_dir), max_length=16), dest).path


# -- warehouses ew wrote, shared by the tests of readers, schemas, heads and prediction ----------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "debian_sample.jsonl"
SECTIONS = ("libs", "python", "perl", "doc")


@pytest.fixture(scope="session")
def labelled_corpus(tmp_path_factory):
    """240 real Debian descriptions from four sections, 60 each."""
    taken = {section: 0 for section in SECTIONS}
    lines = []
    for line in EXAMPLES.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if taken.get(record["section"], 60) < 60:
            taken[record["section"]] += 1
            lines.append(line)
    path = tmp_path_factory.mktemp("corpus") / "debian.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, tiny_bert_dir, labelled_corpus):
    from pipelines.ingest import ingest
    from warehouse import Warehouse

    wh = Warehouse.open(tmp_path_factory.mktemp("ingested") / "wh", create=True)
    ingest(wh, labelled_corpus, model=str(tiny_bert_dir), chunk_size=100)
    return wh


@pytest.fixture(scope="session")
def states_ingested(tmp_path_factory, tiny_bert_dir, labelled_corpus):
    """The first 40 labelled documents ingested with layer-1 token states (fp16)."""
    from pipelines.ingest import ingest
    from warehouse import Warehouse

    corpus = tmp_path_factory.mktemp("states-corpus") / "debian.jsonl"
    corpus.write_text("".join(labelled_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    wh = Warehouse.open(tmp_path_factory.mktemp("states-ingested") / "wh", create=True)
    ingest(wh, corpus, model=str(tiny_bert_dir), token_states=1)
    return wh


@pytest.fixture(scope="session")
def fitted(tmp_path_factory, ingested):
    """The ingested warehouse, copied, with one head trained on `section`."""
    from pipelines.fitting import fit_head
    from warehouse import Warehouse

    root = tmp_path_factory.mktemp("fitted") / "wh"
    shutil.copytree(ingested.root, root)
    wh = Warehouse.open(root)
    fit_head(wh, label="section", epochs=5, name="section-head")
    return wh


@pytest.fixture
def warehouse_copy(tmp_path, ingested):
    """A private copy of the ingested warehouse, for tests that write."""
    from warehouse import Warehouse

    shutil.copytree(ingested.root, tmp_path / "wh")
    return Warehouse.open(tmp_path / "wh")


@pytest.fixture
def fitted_copy(tmp_path, fitted):
    from warehouse import Warehouse

    shutil.copytree(fitted.root, tmp_path / "fitted")
    return Warehouse.open(tmp_path / "fitted")
