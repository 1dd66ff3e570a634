"""Self-labelling of clusters from their captions."""

import numpy as np
import pytest

from hf_clipneg.clustering.labels import ClusterName, name_clusters, tokenize

CAPTIONS = [
    # cluster 0: red shirts
    "Men Red Cotton Shirt", "Red Slim Fit Shirt for Men", "Women Red Shirt", "Red Checked Shirt",
    # cluster 1: blue jeans
    "Men Blue Denim Jeans", "Blue Skinny Jeans", "Women Blue Jeans", "Blue Jeans", "Blue Jeans",
    # cluster 2: watches (shares "men"/"women" with the others: those must not win)
    "Men Black Analog Watch", "Women Black Digital Watch", "Black Watch for Men",
]
ASSIGNMENTS = np.array([0] * 4 + [1] * 5 + [2] * 3)


def test_distinguishing_words_on_toy_captions():
    names = name_clusters(ASSIGNMENTS, CAPTIONS, top_words=2)
    assert [n.cluster for n in names] == [0, 1, 2]
    assert set(names[0].top_words) == {"red", "shirt"}
    assert set(names[1].top_words) == {"blue", "jeans"}
    assert set(names[2].top_words) == {"black", "watch"}
    for name in names:
        assert isinstance(name, ClusterName)
        assert name.name == " ".join(name.top_words)
        assert not {"men", "women", "for"} & set(name.top_words)
    assert [n.size for n in names] == [4, 5, 3]
    # without text features: most frequent captions first, distinct
    assert names[1].central_captions[0] == "Blue Jeans"
    assert len(names[1].central_captions) == len(set(names[1].central_captions)) == 3


def test_every_cluster_gets_a_name_with_fallback():
    captions = ["red shirt", "red shirt", "the of and", "", "blue jeans"]
    names = name_clusters(np.array([0, 0, 1, 1, 3]), captions)
    assert len(names) == 4  # ids 0..3, cluster 2 has no rows
    assert all(n.name.strip() for n in names)
    assert names[0].name.startswith("red") or names[0].name.startswith("shirt")
    assert names[1].name == "cluster 1" and names[1].top_words == []  # only stopwords / empty
    assert names[2].name == "cluster 2" and names[2].size == 0 and names[2].central_captions == []
    assert "jeans" in names[3].top_words


def test_central_and_nearest_captions_with_features():
    captions = ["a", "b", "c", "d", "e"]
    text = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    centroids = np.array([[0.0, 1.0], [1.0, 0.0]])  # image cluster 0 looks like the "c" caption
    names = name_clusters(np.array([0, 0, 1, 1, 1]), captions, text_features=text, image_centroids=centroids,
                          top_captions=1)
    # cluster 0's text mean ~ (0.95, 0.05): "a" is nearest; cluster 1's mean ~ (0.50, 0.86): "d" nearest
    assert names[0].central_captions == ["a"]
    assert names[1].central_captions == ["d"]
    assert names[0].nearest_caption == "c" and names[1].nearest_caption == "a"
    assert all(n.name.startswith("cluster") for n in names)  # one-letter captions have no words


def test_custom_stopwords_and_tokenize():
    names = name_clusters(ASSIGNMENTS, CAPTIONS, top_words=1, stopwords={"red", "blue", "black"})
    assert [n.name for n in names] == ["shirt", "jeans", "watch"]
    assert tokenize("Women's 2-Pack T-Shirts & Socks") == ["women's", "pack", "shirts", "socks"]


@pytest.mark.parametrize(
    "assignments, captions, kwargs, error, match",
    [
        (np.array([0, 1]), ["a b"], {}, ValueError, "must align"),
        (np.array([0, 1]), ["a b", None], {}, TypeError, "row 1"),
        (np.array([0.0, 1.0]), ["a", "b"], {}, TypeError, "integer"),
        (np.array([0, -1]), ["a", "b"], {}, ValueError, "rows \\[1\\]"),
        (np.array([0, 1]), ["a", "b"], {"text_features": np.array([[np.nan, 0.0], [1.0, 0.0]])}, ValueError, "rows \\[0\\]"),
        (np.array([0, 1]), ["a", "b"], {"text_features": np.ones((3, 2))}, ValueError, "rows=2"),
        (np.array([0, 1]), ["a", "b"], {"image_centroids": np.ones((2, 2))}, ValueError, "needs text_features"),
        (np.array([0, 1]), ["a", "b"], {"text_features": np.ones((2, 2)), "image_centroids": np.ones((2, 3))},
         ValueError, "aligned"),
    ],
)
def test_bad_input(assignments, captions, kwargs, error, match):
    with pytest.raises(error, match=match):
        name_clusters(assignments, captions, **kwargs)
