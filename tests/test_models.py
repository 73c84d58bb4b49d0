"""Model schemas: cached from the API, bundled for the default model, and every row's
params checked against them before anything is sent."""

from __future__ import annotations

from tests.conftest import simple_rows


def test_models_lists_the_bundled_default_with_no_network(cli):
    """With no cache and no network the default model's schema is there to check with."""
    result = cli("models")
    assert result.code == 0 and "wavespeed-ai/hidream-e1-full" in result.out
    assert "bundled" in result.out
    shown = cli("models", "wavespeed-ai/hidream-e1-full")
    assert "output_format: string, optional (one of jpeg, png, webp" in shown.out


def test_refresh_caches_the_catalogue_with_its_age(cli, emulator):
    """`models --refresh` fetches every model's schema and price; later calls show the
    cache and its age, offline."""
    result = cli("models", "--refresh", "--base-url", emulator.base_url)
    assert result.code == 0, result.err
    assert "bytedance/seedream-v4/edit" in result.out and "images" in result.out
    shown = cli("models", "bytedance/seedream-v4/edit")
    assert "images: array, required (1-10 items)" in shown.out and "fetched" in shown.out
    missing = cli("models", "bytedance/seedream-v4/edt")
    assert missing.code == 2 and "did you mean bytedance/seedream-v4/edit" in missing.err


def test_an_unknown_param_fails_validate_offline_with_a_suggestion(
    cli, run, images, write_manifest, emulator
):
    """A param the model does not take: FILE:LINE, the field and a did-you-mean, exit 2,
    from `validate` with no network and from `run` before any request."""
    rows = simple_rows(images, 2)
    rows[1]["params"] = {"output_fromat": "png"}
    path = write_manifest(rows, kind="jsonl")
    result = cli("validate", path)
    assert result.code == 2
    assert f"{path}:2: params.output_fromat: is not a field of" in result.err
    assert "did you mean 'output_format'" in result.err
    assert run(path).code == 2
    assert emulator.stats.submits_accepted + emulator.stats.submits_rejected == 0


def test_a_param_out_of_range_for_a_cached_model_is_refused(cli, write_manifest, images, emulator):
    """Once the catalogue is cached, a value outside the schema (an enum, a list too
    long) is caught offline for that model."""
    assert cli("models", "--refresh", "--base-url", emulator.base_url).code == 0
    rows = simple_rows(images, 1)
    rows[0]["params"] = {"size": "huge"}
    path = write_manifest(rows, kind="yaml", model="bytedance/seedream-v4/edit")
    result = cli("validate", path)
    assert result.code == 2 and "params.size: must match" in result.err


def test_a_multi_image_model_gets_images_as_a_list_and_its_own_price(
    cli, run, write_manifest, images, emulator, tmp_path
):
    """On a model whose schema takes `images`, the upload's URL goes in a list, fields
    the model does not take are not sent, and the live price is the model's."""
    assert cli("models", "--refresh", "--base-url", emulator.base_url).code == 0
    path = write_manifest(simple_rows(images, 2), model="bytedance/seedream-v4/edit")
    result = run(path)
    assert result.code == 0, result.err
    bodies = [p.body for p in emulator.predictions.values()]
    assert len(bodies) == 2
    for body in bodies:
        assert isinstance(body["images"], list) and len(body["images"]) == 1
        assert "image" not in body and "output_format" not in body
    assert result.summary["spend_usd"] == 2 * 0.027
    assert sorted(p.name for p in (tmp_path / "out").glob("row-*")) == [
        "row-0000.jpg",
        "row-0001.jpg",
    ]
