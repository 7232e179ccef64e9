import numpy as np
import pytest
import tf_keras as keras

from models import cnn


@pytest.mark.parametrize("variant", sorted(cnn.VARIANTS))
def test_variants_map_images_to_logits(variant):
    model = cnn.cnn(variant, num_classes=10)
    assert model.output_shape == (None, 10)
    logits = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert logits.shape == (2, 10) and logits.dtype == "float32"


def test_config_round_trip_rebuilds_the_same_function():
    model = cnn.cnn("tiny")
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x, training=False), clone(x, training=False), rtol=1e-5, atol=1e-6)


def test_unknown_variant_lists_the_choices():
    with pytest.raises(ValueError, match="expected one of tiny, small, large"):
        cnn.cnn("huge")


def test_whitening_stem_decorrelates_patches():
    rng = np.random.default_rng(0)
    # Correlated pixels: smooth images, so neighbouring values and channels are far from white.
    base = rng.normal(0, 1, (400, 17, 17, 1)).repeat(2, axis=1).repeat(2, axis=2)[:, :32, :32]
    images = np.clip(128 + 40 * base + rng.normal(0, 5, (400, 32, 32, 3)), 0, 255)
    model = cnn.cnn("tiny")
    cnn.init_whitening(model, images)
    stem = keras.Model(model.input, model.get_layer("whiten").output)
    features = np.asarray(stem(images.astype(np.float32))).reshape(-1, cnn.WHITENING_WIDTH)[:, :12]
    covariance = np.cov(features, rowvar=False)
    # Unit variance along each eigen-direction, up to the eps regulariser; no cross-correlation.
    np.testing.assert_allclose(np.diag(covariance), 1.0, atol=0.15)
    off_diagonal = covariance - np.diag(np.diag(covariance))
    assert np.abs(off_diagonal).max() < 0.05


def test_convs_start_as_partial_identity():
    model = cnn.cnn("tiny")
    kernel = model.get_layer("block2_conv1").get_weights()[0]  # 16 -> 32 channels
    for c in range(16):
        assert kernel[1, 1, c, c] == 1.0 and np.count_nonzero(kernel[:, :, :, c]) == 1
    assert np.count_nonzero(kernel[:, :, :, 16:]) > 0  # the rest keeps its random init
