"""PatchCoreEnsemble: each member scores a photo exactly as it would on its own."""

import numpy as np
import pytest
from PIL import Image

from conftest import small_model_settings
from patchcore import PatchCoreEnsemble


@pytest.fixture(scope="module")
def ensemble(product_images):
    settings = small_model_settings(crop=None)
    settings.pop("backbone")
    return PatchCoreEnsemble(["efficientnet_lite0", "efficientnet_lite0"], settings).fit(product_images["train"])


def test_a_jpeg_is_scored_as_each_member_scores_it(tmp_path, product_images, ensemble):
    # A large JPEG: members decode it at the DCT scale their 64 px input needs (1/8), not in full.
    photo = Image.open(product_images["defective"][0]).resize((512, 512), Image.BICUBIC)
    photo.save(tmp_path / "photo.jpg", quality=90)
    [got] = ensemble.predict([tmp_path / "photo.jpg"], maps=False)
    own = [member.predict([tmp_path / "photo.jpg"], maps=False)[0] for member in ensemble.members_]
    standardised = [(p.patch_scores - m.normal_patch_score_mean_) / m.normal_patch_score_std_
                    for m, p in zip(ensemble.members_, own)]
    expected_score = np.mean([(p.score - m.normal_patch_score_mean_) / m.normal_patch_score_std_
                              for m, p in zip(ensemble.members_, own)])
    assert got.score == pytest.approx(expected_score, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(got.patch_scores, np.mean(standardised, axis=0), rtol=1e-6, atol=1e-6)
    assert got.placement == own[0].placement  # the map refers to the photo's own 512x512 pixels
