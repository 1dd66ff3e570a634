"""ClipNegRetriever: embedding shapes, exact and IVF search, index persistence and loading errors."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from hf_clipneg.retrieval import ClipNegRetriever, IndexType, NotADualEncoderError, SearchHit

DIM = 16  # projection_dim of build_tiny_dual_encoder()
COLOURS = ["red", "green", "blue", "yellow", "white"]


@pytest.fixture
def retriever(tiny_dual_encoder):
    return ClipNegRetriever(*tiny_dual_encoder, device="cpu")


def _clustered(n=1500, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    return (centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, DIM))).astype(np.float32)


def test_embeddings_have_model_dim_unit_norm_and_ignore_batching(retriever, tmp_path):
    images = [Image.new("RGB", (20 + 3 * i, 24), colour) for i, colour in enumerate(COLOURS)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    batched = retriever.embed_images(images, batch_size=2, show_progress=False)
    assert batched.shape == (5, DIM) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(retriever.embed_images(images, batch_size=5, show_progress=False), batched, atol=1e-5)
    np.testing.assert_allclose(retriever.embed_images([str(p) for p in paths], show_progress=False), batched, atol=1e-5)
    assert not np.allclose(batched[0], batched[2], atol=1e-3)  # different pictures, different vectors

    from datasets import Dataset, Features, Image as ImageFeature, Value

    dataset = Dataset.from_dict(
        {"picture": [str(p) for p in paths], "caption": COLOURS},
        features=Features({"picture": ImageFeature(), "caption": Value("string")}),
    )
    from_dataset = retriever.embed_images(dataset, image_column="picture", batch_size=3, show_progress=False)
    np.testing.assert_allclose(from_dataset, batched, atol=1e-5)
    with pytest.raises(KeyError, match="no column 'image'"):
        retriever.embed_images(dataset, show_progress=False)

    texts = [f"a {colour} photo" for colour in COLOURS]
    text_vectors = retriever.embed_texts(texts, batch_size=2, show_progress=False)
    assert text_vectors.shape == (5, DIM)
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(retriever.embed_texts(texts, batch_size=64, show_progress=False), text_vectors, atol=1e-5)
    long_text = " ".join(["red"] * 500)  # longer than the tiny BERT's 64 positions: truncated, not a crash
    assert retriever.embed_texts([long_text], show_progress=False).shape == (1, DIM)


def test_search_ranks_by_cosine_with_ids_scores_and_ranks(retriever):
    vectors = _clustered(n=40)
    ids = [f"item-{i}" for i in range(40)]
    retriever.index_embeddings(vectors * 5.0, ids=ids)  # scale must not matter: normalised inside
    queries = vectors[[3, 17]] + 0.01
    results = retriever.search_embeddings(queries, k=5)
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for query, hits in zip(queries, results):
        cosines = normalised @ (query / np.linalg.norm(query))
        expected = np.argsort(-cosines)[:5]
        assert [hit.id for hit in hits] == [ids[i] for i in expected]
        assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([hit.score for hit in hits], cosines[expected], atol=1e-5)
    assert results[0][0].id == "item-3" and results[1][0].id == "item-17"
    assert isinstance(results[0][0], SearchHit)


def test_search_by_text_and_by_image_use_the_model_embeddings(retriever):
    images = [Image.new("RGB", (16, 16), colour) for colour in COLOURS]
    texts = [f"a {colour} photo" for colour in COLOURS]
    retriever.index_images(images, ids=COLOURS, show_progress=False)
    retriever.index_texts(texts, show_progress=False)
    assert retriever.indexed_size("images") == 5 and retriever.indexed_size("texts") == 5

    by_text = retriever.search(texts[:2], k=3)
    expected = retriever.search_embeddings(retriever.embed_texts(texts[:2], show_progress=False), k=3)
    assert by_text == expected
    assert len(by_text) == 2 and all(len(hits) == 3 for hits in by_text)

    by_image = retriever.search_by_image(images[1], k=5)
    expected = retriever.search_embeddings(
        retriever.embed_images([images[1]], show_progress=False), k=5, target="texts"
    )
    assert by_image == expected
    assert sorted(hit.id for hit in by_image[0]) == [0, 1, 2, 3, 4]


def test_empty_index_and_bad_queries_raise_clear_errors(retriever):
    with pytest.raises(RuntimeError, match="index some images first with index_images"):
        retriever.search(["a red photo"])
    with pytest.raises(RuntimeError, match="index some texts first with index_texts"):
        retriever.search_by_image(Image.new("RGB", (8, 8)))
    retriever.index_embeddings(_clustered(n=10), ids=list("abcdefghij"))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retriever.search_embeddings(_clustered(n=1), k=0)
    with pytest.raises(ValueError, match="dimension 3"):
        retriever.search_embeddings(np.ones((1, 3)))
    with pytest.raises(ValueError, match="Text row 1 is empty"):
        retriever.search(["a red photo", "   "])
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        retriever.index_embeddings(np.where(np.arange(3)[:, None] == 2, np.nan, 1.0) * np.ones((3, DIM)))
    with pytest.raises(ValueError, match="id 'a' appears at rows 0 and 2"):
        retriever.index_embeddings(_clustered(n=3), ids=["a", "b", "a"])
    with pytest.raises(ValueError, match="index_type must be one of"):
        retriever.index_embeddings(_clustered(n=3), index_type="hnsw")


def test_k_larger_than_index_is_clamped_with_a_warning(retriever, caplog):
    retriever.index_embeddings(_clustered(n=3), ids=["x", "y", "z"])
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.retrieval"):
        hits = retriever.search_embeddings(_clustered(n=2, seed=5), k=10)
    assert [len(row) for row in hits] == [3, 3]
    assert "k=10 is larger than the 3 indexed images" in caplog.text


def test_ivf_recall_close_to_flat(retriever):
    vectors = _clustered(n=1500, clusters=30)
    queries = _clustered(n=100, clusters=30, seed=0)[:100] + 0.05
    retriever.index_embeddings(vectors, index_type="flat")
    exact = retriever.search_embeddings(queries, k=10)
    retriever.index_embeddings(vectors, index_type=IndexType.IVF, nprobe=40)
    collection = retriever._collections["images"]
    assert collection.nlist == round(4 * np.sqrt(1500)) and collection.nprobe == 40
    approx = retriever.search_embeddings(queries, k=10)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9

    retriever.index_embeddings(vectors, index_type="ivf", nlist=100, nprobe=1)
    rough = retriever.search_embeddings(queries, k=10)
    rough_recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(rough, exact)])
    assert rough_recall < recall  # nprobe really is applied


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_save_and_load_index_give_identical_results(tiny_dual_encoder, tmp_path, index_type):
    retriever = ClipNegRetriever(*tiny_dual_encoder, device="cpu")
    vectors = _clustered(n=300)
    ids = [f"img-{i}" for i in range(300)]
    retriever.index_embeddings(vectors, ids=ids, index_type=index_type, nprobe=4)
    queries = _clustered(n=20, seed=3)
    before = retriever.search_embeddings(queries, k=7)
    path = tmp_path / "sub" / "images.faiss"
    retriever.save_index(path)
    sidecar = json.loads((tmp_path / "sub" / "images.faiss.json").read_text())
    assert sidecar["ids"] == ids and sidecar["index_type"] == index_type and sidecar["dim"] == DIM

    fresh = ClipNegRetriever(*tiny_dual_encoder, device="cpu")
    fresh.load_index(path)
    assert fresh.indexed_size("images") == 300 and fresh.indexed_size("texts") == 0
    assert fresh.search_embeddings(queries, k=7) == before
    fresh.load_index(path, target="texts")
    assert fresh.search_embeddings(queries, k=7, target="texts") == before


def test_load_index_rejects_non_faiss_and_mismatched_files(retriever, tmp_path, caplog):
    not_an_index = tmp_path / "notes.faiss"
    not_an_index.write_bytes(b"this is a text file, certainly not a faiss index at all\n" * 3)
    with pytest.raises(ValueError, match="is not a faiss index"):
        retriever.load_index(not_an_index)
    tiny = tmp_path / "tiny.faiss"
    tiny.write_bytes(b"IxFI")
    with pytest.raises(ValueError, match="is not a faiss index"):
        retriever.load_index(tiny)
    with pytest.raises(FileNotFoundError, match="No index file"):
        retriever.load_index(tmp_path / "missing.faiss")

    retriever.index_embeddings(_clustered(n=50), ids=list(range(50)), index_type="ivf", nlist=4)
    good = tmp_path / "good.faiss"
    retriever.save_index(good)
    with pytest.raises(ValueError, match="is not a faiss index"):
        retriever.load_index(str(good) + ".json")  # the sidecar passed by mistake

    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(good.read_bytes()[:200])
    (tmp_path / "truncated.faiss.json").write_text((tmp_path / "good.faiss.json").read_text())
    with pytest.raises(ValueError, match="faiss cannot read"):
        retriever.load_index(truncated)

    no_sidecar = tmp_path / "no_sidecar.faiss"
    no_sidecar.write_bytes(good.read_bytes())
    with pytest.raises(FileNotFoundError, match="has no sidecar"):
        retriever.load_index(no_sidecar)

    from hf_clipneg.testing import build_tiny_dual_encoder

    narrow = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=8), device="cpu")
    with pytest.raises(ValueError, match="holds 16-dimensional vectors but this model embeds into 8"):
        narrow.load_index(good)

    other_weights = ClipNegRetriever(*build_tiny_dual_encoder(seed=1), device="cpu")
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.retrieval"):
        other_weights.load_index(good)
    assert "different projection weights" in caplog.text
    assert other_weights.indexed_size() == 50


def test_from_pretrained_round_trip_and_errors(tiny_dual_encoder, tmp_path):
    from transformers import BertConfig, BertModel

    model, processor = tiny_dual_encoder
    folder = tmp_path / "dual"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded = ClipNegRetriever.from_pretrained(folder, device="cpu")
    original = ClipNegRetriever(model, processor, device="cpu")
    texts = ["a red circle", "a blue square"]
    np.testing.assert_allclose(
        loaded.embed_texts(texts, show_progress=False), original.embed_texts(texts, show_progress=False), atol=1e-6
    )
    assert loaded.model_fingerprint() == original.model_fingerprint()

    bert_folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert_folder)
    with pytest.raises(NotADualEncoderError, match="is a 'bert' checkpoint .*BertModel"):
        ClipNegRetriever.from_pretrained(bert_folder)
    with pytest.raises(NotADualEncoderError, match="needs a VisionTextDualEncoderModel"):
        ClipNegRetriever(BertModel.from_pretrained(bert_folder), processor)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipNegRetriever.from_pretrained(tmp_path / "nowhere")

    weights_only = tmp_path / "weights_only"
    model.save_pretrained(weights_only)  # no tokenizer / image processor files
    with pytest.raises(OSError, match="could not load its weights or processor"):
        ClipNegRetriever.from_pretrained(weights_only)
