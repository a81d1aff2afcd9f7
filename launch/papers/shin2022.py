"""Shin, Lee, Kim, Lee (ECCV 2022), "Teaching Where to Look: Attention
Similarity Knowledge Distillation for Low Resolution Face Recognition".

Embedded benchmark: ``configs/recipes/attention_distill.py`` (mode=compare)
per seed: a CBAM WRN-16-2 teacher on the 26 upper-case glyphs at 32x32, then
per down-sampling factor 2, 4, 8 a student alone and four distilled students
(logit KD, feature distillation, attention transfer, A-SKD) on the
down-sampled images. Metrics: classification accuracy on the down-sampled
``glyphs/upper:test`` (bootstrap over its 2,600 images from the saved
predictions) and verification on 3,000 pairs of the held-out lower-case
glyphs (10-fold accuracy and TAR at FAR 1e-3, insightface's protocol; seed
spread only).
"""

from __future__ import annotations

from configs.recipes import attention_distill
from launch.papers import ACCURACY, Claim, Metric, Paper, resample_test_sets

FACTORS = (2, 4, 8)
QUICK_FACTORS = (4,)
QUICK_ARMS = ("student", "kd", "askd")
TEST_SIZE = 2600  # glyphs/upper:test
ARM_TEXT = {
    "student": "student alone on the down-sampled images (cross-entropy)",
    "kd": "+ logit KD (tau 4)",
    "fd": "+ feature distillation (MSE of the penultimate features)",
    "at": "+ attention transfer (beta 1000)",
    "askd": "+ A-SKD (lambda 5: cosine distance of the CBAM channel and spatial maps)",
}


def recipe(seed: int, quick: bool):
  if quick:
    c = attention_distill.get_config(
        "factors=4,arms=" + "+".join(QUICK_ARMS) + ",steps=100,depth=10,width=1,batch_size=64,num_pairs=1000")
  else:
    c = attention_distill.get_config("mode=compare")
  c.seed = seed
  c.progress_bar = False
  c.plots = False
  return c


VERIFICATION = Metric("test/verification_accuracy", "verification accuracy (held-out)", True)
TAR = Metric("test/tar_at_far_1e-3", "TAR at FAR 1e-3 (held-out)", True)
METRICS = (ACCURACY, VERIFICATION, TAR)

ARMS = {"teacher": "CBAM teacher at full resolution (32x32)"}
for _f in FACTORS:
  ARMS.update({f"{a}_{_f}": f"x{_f} ({32 // _f}x{32 // _f}): {t}" for a, t in ARM_TEXT.items()})

CLAIMS = []
for _f in FACTORS:
  CLAIMS += [
      Claim(f"A-SKD beats the student alone at x{_f}", "test/accuracy", f"askd_{_f}",
            f"student_{_f}", "Table 1/2: A-SKD improves every resolution over the baseline"),
      Claim(f"A-SKD beats logit KD at x{_f}", "test/accuracy", f"askd_{_f}", f"kd_{_f}",
            "Table 2: A-SKD vs KD (Hinton et al.)"),
      Claim(f"A-SKD improves verification over the student alone at x{_f}",
            "test/verification_accuracy", f"askd_{_f}", f"student_{_f}",
            "Table 1: AgeDB-30 verification accuracy"),
  ]
CLAIMS.append(Claim(
    "A-SKD's gain over the student alone is largest at the lowest resolution (x8 > x2)",
    "test/accuracy", "askd_8-student_8", "askd_2-student_2",
    "§4.3: the gain grows as the resolution drops (14x14 vs 56x56)"))

PAPER = Paper(
    name="shin2022",
    title="Shin et al. (ECCV 2022): attention similarity knowledge distillation (A-SKD)",
    recipe=recipe,
    arms=ARMS,
    metrics=METRICS,
    claims=tuple(CLAIMS),
    resample=resample_test_sets((TEST_SIZE,)),
    main_arms=tuple(ARMS),
    protocol=(
        "Embedded benchmark (`configs/recipes/attention_distill.py:mode=compare`): identities = "
        "the 26 upper-case `glyphs/upper` classes (10,400 training images, 32x32x1), WRN-16-2 "
        "with CBAM on every block, SGD Nesterov lr 0.1 cosine, wd 5e-4, batch 128, 15 epochs, "
        "cross-entropy, no augmentation. Teacher at full resolution; students from scratch on "
        "`downsample(f)` (nearest down/up-sampling and the reference's 5x5 Gaussian blur), "
        "f = 2, 4, 8 (16, 8, 4 pixels), with the frozen teacher seeing the full-resolution image. "
        "A-SKD: CE + 5 x sum over blocks of the cosine distance of the pre-sigmoid CBAM channel "
        "and spatial maps (gist-ailab/teaching-where-to-look). Baselines: logit KD (tau 4), "
        "feature MSE, attention transfer (beta 1000). Evaluation at the student's resolution: "
        "accuracy on `glyphs/upper:test`; verification on 3,000 seeded pairs of the held-out "
        "`glyphs/lower:test` identities, penultimate features L2-normalised, 10-fold threshold "
        "selection and TAR at FAR 1e-3 as insightface's `verification.py` (no flip test). "
        "Intervals: seeds, and for accuracy a paired bootstrap over test images. Quick mode: "
        "x4 only, arms teacher/student/kd/askd, WRN-10-1, 100 steps of batch 64 per stage, "
        "1,000 pairs."),
    not_covered=(
        "The paper's face setting (CASIA-WebFace training, AgeDB-30 / LFW verification, "
        "iResNet-50-CBAM, ArcFace) is `variant=face,data=...,verify=...` of the recipe, not run "
        "here; the paper's cross-resolution and TinyFace / object-detection experiments are not "
        "covered."),
)
