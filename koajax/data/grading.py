"""Grades of the synthetic cohort: disease course, OARSI features, reader noise.

Every knee carries a latent severity that grows over time and never falls:

  s(t) = subject effect + knee effect + rate * years.

Cut points on `s`, calibrated so that the pooled Kellgren-Lawrence (KL) grade
of all visits follows `CohortConfig.kl_distribution`, give the true KL. Within
a grade, `s` maps linearly onto a continuous severity `c` in [0, 5) whose
integer part is the KL grade. The six OARSI features are non-decreasing
functions of `c` plus fixed per-knee offsets, clipped to ranges that the KL
definitions allow at that grade, so they agree with KL, differ between knees
of one grade and never regress between visits.

A reader sees `c` with a heavy-tailed error, then grades that perceived
severity the same way; this makes recorded grades disagree with the truth
mostly by one grade while staying coherent with each other, like a second
radiologist.

Further readers (`CohortConfig.readers`, `read_kl`) grade KL the same way,
each with its own error scale and its own random errors: simulated
radiologists to compare a model with. The smaller a reader's scale, the more
often that reader agrees with the recorded grades.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from koajax.data import schema

OST = tuple(schema.OARSI_GRADES[:4])  # ost_fl, ost_fm, ost_tl, ost_tm
JSN = tuple(schema.OARSI_GRADES[4:])  # jsn_l, jsn_m
# Compartment (0 lateral, 1 medial) of each feature in OARSI_GRADES order.
COMPARTMENT = np.array([0, 1, 0, 1, 0, 1])

# Allowed OARSI range per true KL (rows KL 0..4), following the KL definitions:
# KL1 doubtful narrowing and possible lipping, KL2 definite osteophytes and
# possible narrowing, KL3 multiple osteophytes and definite narrowing, KL4
# large osteophytes and marked narrowing.
_JSN_MAIN_LO = np.array([0, 0, 0, 1, 2])  # the knee's more diseased compartment
_JSN_HI = np.array([0, 1, 1, 2, 3])
_OST_HI = np.array([0, 1, 2, 3, 3])
_OST_LEAD_LO = np.array([0, 0, 1, 1, 2])  # one osteophyte that KL2+ requires
_OST_SECOND_LO = np.array([0, 0, 0, 1, 1])  # "multiple" osteophytes at KL3+
_JSN_KNOTS = np.array([0.0, 1.0, 1.5, 2.5, 3.5, 4.5, 5.0])
_JSN_MEAN = np.array([-1.0, -0.2, 0.2, 0.5, 1.4, 2.7, 3.0])


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """Options of the synthetic cohort; `generate(**options)` overrides them."""
  visits: tuple[int, ...] = (0, 12, 24, 48)  # months since baseline
  attendance: tuple[float, ...] = (1.0, 0.7, 0.6, 0.45)  # P(visit acquired)
  sites: tuple[str, ...] = ('A', 'B', 'C', 'D', 'E')
  site_weights: tuple[float, ...] = (0.25, 0.2, 0.2, 0.2, 0.15)
  # Pooled KL 0..4 frequencies over all visits (OAI-like).
  kl_distribution: tuple[float, ...] = (0.40, 0.19, 0.24, 0.13, 0.04)
  subject_sd: float = 0.75  # shared by both knees of a subject
  knee_sd: float = 0.65  # makes the two knees of a subject differ
  fast_fraction: float = 0.25  # share of knees that progress quickly
  fast_rate: float = 0.22  # mean latent units per year of fast progressors
  slow_rate: float = 0.03
  # Beta(a, b) share of disease in the medial compartment; mean 0.69 makes
  # medial disease the common pattern and ~14% of knees lateral-dominant.
  medial_share: tuple[float, float] = (4.5, 2.0)
  # Scale of the reader's Student-t (4 d.o.f.) error in continuous-KL units;
  # 0.58 gives a quadratic kappa of about 0.8 between recorded and true KL,
  # with ~40% of knees off by one grade and ~5% by two.
  reader_noise: float = 0.58
  # Error scales (same units) of further readers r1, r2, ... who grade KL
  # only. Against the recorded grades, on knees both call KL 0 or 2, they
  # agree on about 92%, 91% and 89% (the confidence-driven paper's
  # radiologists: 92-93%).
  readers: tuple[float, ...] = (0.3, 0.4, 0.5)
  oarsi_flip: float = 0.05  # extra independent +-1 flips of OARSI grades
  ungraded_fraction: float = 0.0  # subjects whose grades are left empty

  def __post_init__(self):
    if len(self.attendance) != len(self.visits):
      raise ValueError(
          f'attendance has {len(self.attendance)} entries but visits has '
          f'{len(self.visits)} ({self.visits}); give one probability per visit')
    if len(self.site_weights) != len(self.sites):
      raise ValueError(
          f'site_weights has {len(self.site_weights)} entries but sites has '
          f'{len(self.sites)}; give one weight per site')
    if not all(noise >= 0 for noise in self.readers):
      raise ValueError(f'readers {self.readers}: give error scales >= 0')


@dataclasses.dataclass(frozen=True)
class KneeTraits:
  """Per-knee constants of the disease pattern (arrays over knees)."""
  medial_share: np.ndarray  # (n,) in (0, 1)
  offsets: np.ndarray  # (n, 6) uniform [0, 1) per OARSI feature
  lead_ost: np.ndarray  # (n,) index into OST of the obligatory osteophyte
  second_ost: np.ndarray  # (n,) index into OST of the second osteophyte


def sample_traits(rng: np.random.Generator, n: int,
                  config: CohortConfig = CohortConfig()) -> KneeTraits:
  """Samples the fixed disease pattern of `n` knees."""
  share = rng.beta(*config.medial_share, size=n)
  main = (share >= 0.5).astype(int)  # 1 = medial-dominant
  bone = rng.integers(0, 2, size=n)  # 0 femur, 1 tibia
  lead = 2 * bone + main
  # The second osteophyte: the other bone of the main compartment or the
  # same bone of the other compartment.
  other_bone = rng.random(n) < 0.6
  second = np.where(other_bone, 2 * (1 - bone) + main, 2 * bone + (1 - main))
  return KneeTraits(share, rng.random((n, 6)), lead, second)


def oarsi_levels(c: np.ndarray, traits: KneeTraits) -> np.ndarray:
  """Continuous OARSI levels (n, 6) for continuous severities `c` (n,).

  The integer part of a level is the grade; the fraction tells the renderer
  where in that grade a knee is. Levels never decrease when `c` grows.

  Args:
    c: continuous severity in [0, 5); floor(c) is the KL grade.
    traits: the knees' fixed pattern.

  Returns:
    (n, 6) float array in schema.OARSI_GRADES order.
  """
  c = np.asarray(c, np.float64)
  kl = np.floor(c).astype(int)
  share = np.stack([1 - traits.medial_share, traits.medial_share], 1)  # (n, 2)
  rel = share / share.max(1, keepdims=True)  # main compartment = 1
  main = np.argmax(share, 1)
  n = len(c)
  levels = np.zeros((n, 6))
  lo = np.zeros((n, 6), int)
  hi = np.zeros((n, 6), int)
  # Osteophytes: every compartment grows them, the main one faster.
  for j in range(4):
    w = 0.35 + 0.65 * rel[:, COMPARTMENT[j]]
    levels[:, j] = 1.1 * w * (c - 1.6) + traits.offsets[:, j]
    hi[:, j] = _OST_HI[kl]
  rows = np.arange(n)
  lo[rows, traits.second_ost] = _OST_SECOND_LO[kl]
  lo[rows, traits.lead_ost] = _OST_LEAD_LO[kl]
  # Narrowing mostly in the main compartment; its expected grade rises
  # convexly with severity (about 0.2, 0.5, 1.4, 2.7 in the middle of KL1-4).
  jsn_main = np.interp(c, _JSN_KNOTS, _JSN_MEAN)
  for j in (4, 5):
    comp = COMPARTMENT[j]
    levels[:, j] = rel[:, comp] * jsn_main + traits.offsets[:, j]
    lo[:, j] = np.where(main == comp, _JSN_MAIN_LO[kl], 0)
    hi[:, j] = _JSN_HI[kl]
  return np.clip(levels, lo, hi + 0.999)


def grades_from_levels(c: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """Integer grades (n, 7) in schema.GRADES order."""
  kl = np.floor(c).astype(int)[:, None]
  return np.concatenate([kl, np.floor(levels).astype(int)], 1)


def _latent(rng: np.random.Generator, n_subjects: int, config: CohortConfig,
            n_visits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Latent severity (n_subjects, 2, n_visits) and attendance mask."""
  n_visits = len(config.visits) if n_visits is None else n_visits
  subject = rng.normal(0, config.subject_sd, (n_subjects, 1, 1))
  knee = rng.normal(0, config.knee_sd, (n_subjects, 2, 1))
  fast = rng.random((n_subjects, 2, 1)) < config.fast_fraction
  rate = np.where(fast, rng.exponential(config.fast_rate, fast.shape),
                  np.abs(rng.normal(0, config.slow_rate, fast.shape)))
  years = np.asarray(config.visits, np.float64) / 12
  s = subject + knee + rate * years
  attended = rng.random((n_subjects, n_visits)) < np.asarray(config.attendance)
  attended[:, 0] = True  # every subject has a baseline
  return s, attended


@functools.lru_cache(maxsize=8)
def kl_cut_points(config: CohortConfig) -> np.ndarray:
  """Latent cut points (4,) between KL grades for the pooled target mix."""
  # A large fixed-seed cohort, so the cut points depend on the options only.
  rng = np.random.default_rng(20240917)
  s, attended = _latent(rng, 40_000, config)
  pooled = s.transpose(0, 2, 1)[attended].ravel()
  q = np.cumsum(config.kl_distribution)[:-1] / np.sum(config.kl_distribution)
  return np.quantile(pooled, q)


def continuous_severity(s: np.ndarray, cuts: np.ndarray) -> np.ndarray:
  """Maps latent severity onto [0, 5) with one unit per KL grade."""
  # The open-ended end grades get finite widths: 1.5 and 1.0 latent units.
  edges = np.concatenate([[cuts[0] - 1.5], cuts, [cuts[-1] + 1.0]])
  return np.clip(np.interp(s, edges, np.arange(6.0)), 0.0, 4.999)


def _perceive(c: np.ndarray, rng: np.random.Generator,
              config: CohortConfig) -> np.ndarray:
  # Heavy tails: most disagreements are one grade, a few are two.
  error = config.reader_noise * rng.standard_t(4, c.shape)
  return np.clip(c + error, 0.0, 4.999)


@functools.lru_cache(maxsize=8)
def _reader_calibration(config: CohortConfig) -> tuple[np.ndarray, np.ndarray]:
  """Quantiles of perceived and of true severity over a large cohort.

  Noise alone would move knees out of the end grades (a KL 0 knee can only be
  misread upwards), so recorded grades would drift away from the target KL
  mix. Mapping perceived severity through these quantiles keeps the reader's
  ranking of knees and gives recorded grades the target mix, as a real
  reader's grades have the cohort's mix.
  """
  rng = np.random.default_rng(20240918)
  s, attended = _latent(rng, 40_000, config)
  c = continuous_severity(s.transpose(0, 2, 1)[attended].ravel(),
                          kl_cut_points(config))
  q = np.linspace(0.0, 1.0, 2001)
  return np.quantile(_perceive(c, rng, config), q), np.quantile(c, q)


def read(c: np.ndarray, traits: KneeTraits, rng: np.random.Generator,
         config: CohortConfig = CohortConfig()) -> np.ndarray:
  """Grades (n, 7) that a reader records for knees of true severity `c`."""
  perceived = np.interp(_perceive(c, rng, config),
                        *_reader_calibration(config))
  grades = grades_from_levels(perceived, oarsi_levels(perceived, traits))
  flip = rng.random(grades[:, 1:].shape) < config.oarsi_flip
  step = rng.choice([-1, 1], size=flip.shape)
  grades[:, 1:] = np.clip(grades[:, 1:] + flip * step, 0, 3)
  return grades


def reader_names(config: CohortConfig) -> tuple[str, ...]:
  """Names of the further readers: r1, r2, ... in `config.readers` order."""
  return tuple(f'r{i + 1}' for i in range(len(config.readers)))


def read_kl(c: np.ndarray, noise: float, rng: np.random.Generator,
            config: CohortConfig = CohortConfig()) -> np.ndarray:
  """KL grades (n,) that a further reader with error scale `noise` records.

  Like `read`, with the reader's own calibration, so every reader's grades
  follow the target KL mix however noisy the reader is.
  """
  reader = dataclasses.replace(config, reader_noise=float(noise))
  perceived = np.interp(_perceive(np.asarray(c, np.float64), rng, reader),
                        *_reader_calibration(reader))
  return np.floor(perceived).astype(int)


def sample_cohort(
    rng: np.random.Generator, num_subjects: int,
    config: CohortConfig = CohortConfig()) -> dict[str, np.ndarray]:
  """Samples subjects, visits, sites and true and recorded grades.

  Args:
    rng: the cohort's random generator.
    num_subjects: number of subjects; each has both knees at baseline and at
      a random subset of the later visits.
    config: cohort options.

  Returns:
    Column arrays over knees, sorted by subject, visit, side ('R' first):
    subject (index), visit, side, site, severity (continuous true severity),
    levels (n, 6) continuous OARSI levels, true (n, 7) grades,
    recorded (n, 7) grades with schema.UNGRADED for ungraded subjects, and
    knee (n,) = 2 * subject + (side == 'L'), the knee's index in the cohort.
  """
  s, attended = _latent(rng, num_subjects, config)
  cuts = kl_cut_points(config)
  p = np.asarray(config.site_weights, np.float64)
  site = rng.choice(len(config.sites), size=num_subjects, p=p / p.sum())
  traits_all = sample_traits(rng, 2 * num_subjects, config)
  ungraded = rng.random(num_subjects) < config.ungraded_fraction

  subj, visit, side = np.nonzero(
      np.repeat(attended[:, :, None], 2, axis=2))
  knee = 2 * subj + side
  traits = KneeTraits(*(getattr(traits_all, f.name)[knee]
                        for f in dataclasses.fields(KneeTraits)))
  c = continuous_severity(s[subj, side, visit], cuts)
  levels = oarsi_levels(c, traits)
  recorded = read(c, traits, rng, config)
  recorded[ungraded[subj]] = schema.UNGRADED
  return {
      'subject': subj,
      'visit': np.asarray(config.visits)[visit],
      'side': np.asarray(schema.SIDES)[side],
      'site': np.asarray(config.sites)[site[subj]],
      'severity': c,
      'levels': levels,
      'true': grades_from_levels(c, levels),
      'recorded': recorded,
      'knee': knee,
  }
