"""Synthetic knee radiograph dataset: the default data of koajax.

Writes bilateral posterior-anterior knee radiographs as 16-bit DICOM files
with the files koajax reads from any dataset:

  manifest.csv   one row per knee (schema.MANIFEST_COLUMNS) with the grades a
                 reader recorded; both knees of an image share its path;
                 then kl_reader_r1, kl_reader_r2, ... the KL grades of
                 further simulated radiologists (`grading.read_kl`, error
                 scales `CohortConfig.readers`), empty where the recorded
                 grades are
  landmarks.csv  16 points per knee (schema.LANDMARK_COLUMNS), pixel
                 coordinates of the knee's DICOM
  truth.csv      the noise-free grades rendered into the pixels, plus the
                 continuous severity and joint-space widths (mm)
  images/<subject_id>/v<visit>.dcm
  synthetic.json the generator's settings (marks the folder as koajax's)

Subjects have both knees and several visits at one site; disease never
regresses and tends to progress (see `grading`). Sites differ in detector,
spacing tags, rescale, tone curve, noise and photometric interpretation.
Every image is seeded from (seed, image index), so a seed reproduces the
files byte for byte whatever the number of workers. The further readers draw
from streams of their own and read the severities truth.csv stores, so
adding, removing or changing readers leaves every other output as it was,
and `koajax.data.synthetic_upgrade.add_readers` gives a dataset made before readers existed the columns a
new one would have, byte for byte, without rendering anything again.

Usage:

  python -m koajax.data.synthetic --out=/tmp/synth --num_subjects=560 --seed=0

The dataset is written beside OUT (OUT.partial-<pid>) and replaces it in one
step when complete, so a run that fails or is killed leaves OUT as it was,
and the next run removes the partial folder. OUT must be new, empty or a
dataset of this generator; anything else is refused before anything is
written (exit status 2, see `koajax.cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import tqdm
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from koajax import cli
from koajax.data import anatomy
from koajax.data import atomic
from koajax.data import grading
from koajax.data import radiograph
from koajax.data import schema
from koajax.data import sites


PROGRAM = 'koajax.data.synthetic'
DEFAULT_NUM_SUBJECTS = 560  # about 3,000 knees with the default visits
MANIFEST = 'manifest.csv'
LANDMARKS = 'landmarks.csv'
TRUTH = 'truth.csv'
SETTINGS = 'synthetic.json'
IMAGES = 'images'

CR_STORAGE = '1.2.840.10008.5.1.4.1.1.1'
DX_STORAGE = '1.2.840.10008.5.1.4.1.1.1.1'  # Digital X-Ray, for presentation

# Distinct streams of randomness derived from the user's seed.
_COHORT, _SUBJECT, _IMAGE, _READERS = 101, 202, 303, 404
# Decimals of the severity in truth.csv, which the further readers read.
_SEVERITY_DECIMALS = 4


# Distinctive fake names: a pipeline that leaks them is easy to catch.
_NAME_WORDS = (
    'ALDER', 'BIRCH', 'CEDAR', 'DAHLIA', 'ELM', 'FERN', 'GORSE', 'HAZEL',
    'IRIS', 'JUNIPER', 'KELP', 'LARCH', 'MAPLE', 'NETTLE', 'OAK', 'POPPY',
    'QUINCE', 'ROWAN', 'SORREL', 'TANSY', 'UMBER', 'VETCH', 'WILLOW', 'YARROW',
    'ZINNIA', 'ASPEN', 'BRACKEN', 'CLOVER', 'DOGWOOD', 'HEATHER')


@dataclasses.dataclass(frozen=True)
class ImageTask:
  """Everything a worker needs to render and write one radiograph."""
  index: int
  path: str  # relative to the output directory
  seed: int
  subject: int  # cohort index (for the knee shapes)
  visit: int
  site: str
  severity: tuple[float, float]  # R, L
  levels: tuple[tuple[float, ...], tuple[float, ...]]  # R, L
  identity: dict[str, str]  # DICOM patient and study fields
  variety: float = 1.0  # `sites.detector` and `anatomy.sample_pose`


def _seed_sequence(*key: int) -> np.random.SeedSequence:
  return np.random.SeedSequence([int(k) for k in key])


def knee_shapes(seed: int, subject: int) -> dict[str, anatomy.KneeShape]:
  """The two knees of a subject: one body, two slightly different knees."""
  rng = np.random.default_rng(_seed_sequence(_SUBJECT, seed, subject))
  body = anatomy.sample_shape(rng)
  shapes = {}
  for side in schema.SIDES:
    own = anatomy.sample_shape(rng)
    shapes[side] = dataclasses.replace(
        own, size=body.size * float(1 + rng.normal(0, 0.01)),
        leg_half_width=body.leg_half_width, fat=body.fat,
        density=body.density)
  return shapes


def render_task(task: ImageTask
                ) -> tuple[np.ndarray, np.ndarray, sites.Site]:
  """Renders one image: (stored MONOCHROME2 pixels, landmarks (2, 16, 2))."""
  site = sites.SITES[task.site]
  rng = np.random.default_rng(_seed_sequence(_IMAGE, task.seed, task.index))
  detector = sites.detector(site, rng, task.variety)
  shapes = knee_shapes(task.seed, task.subject)
  knees = []
  for i, side in enumerate(schema.SIDES):
    knees.append(anatomy.Knee(
        side=side, shape=shapes[side],
        disease=anatomy.Disease(task.severity[i], task.levels[i]),
        pose=anatomy.sample_pose(rng, side, detector, task.variety)))
  pixels, points = radiograph.render(knees, detector, rng)
  return pixels, points, site


def _dicom(task: ImageTask, pixels: np.ndarray,
           site: sites.Site) -> pydicom.Dataset:
  """A CR or DX dataset around `pixels` (bone bright)."""
  entropy = [str(task.seed), str(task.subject), str(task.visit)]
  study_uid = generate_uid(entropy_srcs=entropy + ['study'])
  instance_uid = generate_uid(entropy_srcs=entropy + ['image'])
  sop_class = CR_STORAGE if site.modality == 'CR' else DX_STORAGE

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = instance_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = instance_uid
  ds.StudyInstanceUID = study_uid
  ds.SeriesInstanceUID = generate_uid(entropy_srcs=entropy + ['series'])
  ds.Modality = site.modality
  for key, value in task.identity.items():
    setattr(ds, key, value)
  ds.SeriesDate = ds.ContentDate = ds.StudyDate
  ds.SeriesNumber, ds.InstanceNumber = 1, 1
  ds.StudyDescription = 'XR KNEE BILATERAL PA STANDING'
  ds.BodyPartExamined = 'KNEE'
  ds.ViewPosition = 'PA'
  ds.ImageLaterality = 'B'
  ds.PatientOrientation = ['L', 'F']  # columns to the patient's left
  ds.Manufacturer = site.manufacturer
  ds.InstitutionName = f'Synthetic Knee Centre {task.site}'
  ds.ImageType = ['ORIGINAL', 'PRIMARY']
  if site.modality == 'DX':
    ds.PresentationIntentType = 'FOR PRESENTATION'
  spacing = [f'{site.spacing:.4f}'] * 2
  for tag in site.spacing_tags:
    setattr(ds, tag, spacing)

  top = 2**site.bits - 1
  stored = top - pixels if site.photometric == 'MONOCHROME1' else pixels
  ds.set_pixel_data(np.ascontiguousarray(stored, np.uint16),
                    photometric_interpretation=site.photometric,
                    bits_stored=site.bits, generate_instance_uid=False)
  slope, intercept = site.rescale
  ds.RescaleSlope, ds.RescaleIntercept = f'{slope:g}', f'{intercept:g}'
  ds.RescaleType = 'US'
  lo, hi = np.percentile(stored[::8, ::8], [2, 99.5])
  ds.WindowCenter = f'{slope * (lo + hi) / 2 + intercept:.1f}'
  ds.WindowWidth = f'{slope * (hi - lo):.1f}'
  return ds


def _run_task(args: tuple[ImageTask, str]) -> tuple[int, np.ndarray]:
  """Worker entry: renders and writes one DICOM, returns its landmarks."""
  task, out_dir = args
  pixels, points, site = render_task(task)
  path = Path(out_dir) / task.path
  # One level at a time from out_dir, which must exist: a worker left
  # running by a killed run must not make its removed folder again.
  folder = Path(out_dir)
  for part in Path(task.path).parent.parts:
    folder = folder / part
    folder.mkdir(exist_ok=True)
  _dicom(task, pixels, site).save_as(path, enforce_file_format=True)
  return task.index, points


def _identities(rng: np.random.Generator,
                n: int) -> list[tuple[str, str, str, datetime.date]]:
  """Fake patient name, id, sex, birth date and baseline study date."""
  out = []
  for _ in range(n):
    name = 'SYNTH^' + '-'.join(rng.choice(_NAME_WORDS, 2))
    patient_id = 'SYN' + ''.join(rng.choice(list('0123456789ABCDEF'), 8))
    birth = datetime.date(1935, 1, 1) + datetime.timedelta(
        days=int(rng.integers(0, 30 * 365)))
    baseline = datetime.date(2004, 2, 1) + datetime.timedelta(
        days=int(rng.integers(0, 900)))
    sex = 'F' if rng.random() < 0.58 else 'M'
    out.append((name, patient_id, sex, birth, baseline))
  return out


def _visit_identity(person: tuple[Any, ...], visit: int,
                    rng: np.random.Generator) -> dict[str, str]:
  name, patient_id, sex, birth, baseline = person
  date = baseline + datetime.timedelta(
      days=int(round(visit * 30.44 + rng.normal(0, 10))))
  age = (date - birth).days // 365
  return {
      'PatientName': name, 'PatientID': patient_id, 'PatientSex': sex,
      'PatientBirthDate': birth.strftime('%Y%m%d'),
      'PatientAge': f'{age:03d}Y',
      'StudyDate': date.strftime('%Y%m%d'),
      'StudyTime': f'{int(rng.integers(8, 18)):02d}'
                   f'{int(rng.integers(0, 60)):02d}00',
      'AccessionNumber': f'AX{int(rng.integers(10**7, 10**8))}',
      'StudyID': f'{visit:02d}',
  }


def _config(options: dict[str, Any]) -> grading.CohortConfig:
  fields = {f.name for f in dataclasses.fields(grading.CohortConfig)}
  unknown = set(options) - fields
  if unknown:
    raise TypeError(
        f'Unknown options {sorted(unknown)}; known: {sorted(fields)}')
  options = {k: tuple(v) if isinstance(v, list) else v
             for k, v in options.items()}
  if 'sites' in options and 'site_weights' not in options:
    options['site_weights'] = (1.0,) * len(options['sites'])
  config = grading.CohortConfig(**options)
  missing = set(config.sites) - set(sites.SITES)
  if missing:
    raise ValueError(f'Unknown sites {sorted(missing)}; '
                     f'known: {sorted(sites.SITES)}')
  return config


def reader_grades(severity: np.ndarray, graded: np.ndarray, seed: int,
                  config: grading.CohortConfig) -> dict[str, pd.Series]:
  """The further readers' KL grades of the knees, in knee order.

  A pure function of the knees' severities as truth.csv stores them, the
  seed and the options, so the grades can be added to an existing dataset.

  Args:
    severity: (n,) continuous true severity of every knee.
    graded: (n,) bool, the knees with recorded grades; the others stay
      ungraded by every reader, like the recorded grades.
    seed: the dataset's seed.
    config: the cohort options (`readers` holds the error scales).

  Returns:
    Manifest column (kl_reader_<name>) -> nullable Int64 grades, NA where
    not graded.
  """
  c = np.round(np.asarray(severity, np.float64), _SEVERITY_DECIMALS)
  out = {}
  for i, (name, noise) in enumerate(zip(grading.reader_names(config),
                                        config.readers)):
    # Every knee draws its error whether graded or not: a knee's grade does
    # not depend on which other knees are graded.
    rng = np.random.default_rng(_seed_sequence(_READERS, seed, i))
    kl = grading.read_kl(c, noise, rng, config)
    out[schema.reader_column(name)] = pd.Series(pd.array(
        np.where(graded, kl, None), dtype='Int64'))
  return out


def plan(num_subjects: int, seed: int = 0, variety: float = 1.0,
         **options: Any) -> tuple[pd.DataFrame, list[ImageTask]]:
  """Samples the cohort: the knee table and one task per image.

  Args:
    num_subjects: number of subjects.
    seed: the dataset's seed.
    variety: spread of pose, exposure and collimation (`generate`).
    **options: fields of `grading.CohortConfig`.

  Returns:
    (knees, tasks): a DataFrame with one row per knee (ids, site, path,
    recorded and true grades, the further readers' kl_reader_<name> grades,
    severity, joint-space widths) and the image tasks in image order.
  """
  config = _config(options)
  rng = np.random.default_rng(_seed_sequence(_COHORT, seed))
  cohort = grading.sample_cohort(rng, num_subjects, config)
  ids = rng.choice(10**6, size=num_subjects, replace=False)
  subject_ids = np.array([f'9{i:06d}' for i in ids])
  people = _identities(rng, num_subjects)

  knees = pd.DataFrame({
      'subject_id': subject_ids[cohort['subject']],
      'visit': cohort['visit'],
      'side': cohort['side'],
      'site': cohort['site'],
      'subject': cohort['subject'],
      'severity': cohort['severity'],
  })
  knees['path'] = [f'images/{s}/v{v:02d}.dcm'
                   for s, v in zip(knees.subject_id, knees.visit)]
  for j, name in enumerate(schema.GRADES):
    knees[name] = pd.array(
        np.where(cohort['recorded'][:, j] == schema.UNGRADED, None,
                 cohort['recorded'][:, j]), dtype='Int64')
    knees['true_' + name] = cohort['true'][:, j]
  graded = cohort['recorded'][:, 0] != schema.UNGRADED
  for column, grades in reader_grades(cohort['severity'], graded, seed,
                                      config).items():
    knees[column] = grades.to_numpy()

  tasks = []
  # Knees come sorted by subject, visit, side: rows 2i and 2i+1 are image i.
  for index in range(len(knees) // 2):
    r, l = 2 * index, 2 * index + 1
    row = knees.iloc[r]
    tasks.append(ImageTask(
        index=index, path=row.path, seed=seed, subject=int(row.subject),
        visit=int(row.visit), site=str(row.site),
        severity=(float(cohort['severity'][r]), float(cohort['severity'][l])),
        levels=(tuple(map(float, cohort['levels'][r])),
                tuple(map(float, cohort['levels'][l]))),
        identity=_visit_identity(people[int(row.subject)], int(row.visit),
                                 rng),
        variety=float(variety)))
  shapes = {}
  jsw = []
  for s, side, lv in zip(cohort['subject'], cohort['side'], cohort['levels']):
    if s not in shapes:
      shapes[s] = knee_shapes(seed, int(s))
    jsw.append(anatomy.joint_space(shapes[s][side],
                                   anatomy.Disease(levels=tuple(lv))))
  knees['jsw_l_mm'], knees['jsw_m_mm'] = np.array(jsw).T
  return knees, tasks


def _run(tasks: list[ImageTask], out_dir: Path,
         workers: int) -> Iterator[tuple[int, np.ndarray]]:
  jobs = [(task, str(out_dir)) for task in tasks]
  if workers <= 1:
    yield from map(_run_task, jobs)
    return
  # Spawned workers are safe whatever threads the parent (e.g. JAX) runs.
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    yield from pool.imap_unordered(_run_task, jobs, chunksize=4)


def check_output_dir(out_dir: str | os.PathLike) -> str:
  """'new' (nothing there, or an empty folder) or 'dataset' (one this
  generator wrote, which a new one replaces); `cli.BadInput` for anything
  else, which is never touched."""
  out_dir = Path(out_dir)
  if not (out_dir.exists() or out_dir.is_symlink()):
    return 'new'
  if not out_dir.is_dir():
    raise cli.BadInput(f'{out_dir} is a file, not a folder; give a new or '
                       'empty folder for the dataset')
  names = sorted(p.name for p in out_dir.iterdir())
  if not names:
    return 'new'
  try:
    settings = json.loads((out_dir / SETTINGS).read_text(encoding='utf-8'))
  except (OSError, ValueError):
    settings = None
  ours = isinstance(settings, dict) and settings.get('generator') == PROGRAM
  foreign = [n for n in names
             if not ours or n not in (MANIFEST, LANDMARKS, TRUTH, SETTINGS,
                                      IMAGES)]
  if foreign:
    shown = ', '.join(foreign[:6]) + (
        f' and {len(foreign) - 6} more' if len(foreign) > 6 else '')
    raise cli.BadInput(
        f'{out_dir} holds files that are not a koajax synthetic dataset '
        f'({shown}); koajax replaces only datasets it generated: give a new '
        'or empty folder')
  return 'dataset'


# The widest `variety`: beyond it knees leave their half of the film.
MAX_VARIETY = 3.0


def _check_arguments(num_subjects: int, seed: int, workers: int | None,
                     options: dict[str, Any], variety: float = 1.0) -> None:
  if not 1.0 <= variety <= MAX_VARIETY:
    raise cli.BadInput(f'--variety={variety}: give a value from 1 (the '
                       f'standard films) to {MAX_VARIETY:g}')
  if num_subjects < 1:
    raise cli.BadInput(f'--num_subjects={num_subjects}: give 1 or more')
  if seed < 0:
    raise cli.BadInput(f'--seed={seed}: give a whole number >= 0')
  if workers is not None and workers < 1:
    raise cli.BadInput(f'--workers={workers}: give 1 or more processes')
  noise = options.get('reader_noise')
  if noise is not None and not noise >= 0:
    raise cli.BadInput(f'--reader_noise={noise}: give a value >= 0')
  readers = options.get('readers')
  if readers is not None and not all(r >= 0 for r in readers):
    raise cli.BadInput(f'--readers={",".join(map(str, readers))}: give '
                       'error scales >= 0')
  fraction = options.get('ungraded_fraction')
  if fraction is not None and not 0 <= fraction <= 1:
    raise cli.BadInput(f'--ungraded_fraction={fraction}: give a value in '
                       '0..1')


def generate(out_dir: str | os.PathLike[str], *, num_subjects: int,
             seed: int = 0, workers: int | None = None,
             show_progress: bool = True, variety: float = 1.0,
             **options: Any) -> dict[str, Any]:
  """Generates the synthetic dataset in `out_dir`.

  Args:
    out_dir: output directory: new, empty, or a dataset of this generator,
      replaced in one step when the new one is complete.
    num_subjects: number of subjects (each ~2.75 visits x 2 knees).
    seed: the seed; equal seeds give byte-identical files.
    workers: worker processes (default: all CPUs); results do not depend on it.
    show_progress: show a progress bar on stderr.
    variety: how much films differ beyond the sites' own spread, for
      training models that must meet hospital films (a localiser): 1 is the
      standard set; 2 doubles the spread of knee placement (up to 20 mm off
      centre, 10 degrees, 12 % magnification), of exposure and processing,
      and makes collimator blades commoner and up to twice as deep; at most
      3. Knees, grades and readers are the same for any value.
    **options: fields of `grading.CohortConfig`, e.g. reader_noise=0.4,
      ungraded_fraction=0.5, visits=(0, 12) with attendance=(1.0, 0.8),
      readers=() for no further readers.

  Returns:
    A summary: knees, images, subjects, seconds, bytes.

  Raises:
    cli.BadInput: `out_dir` holds anything but a dataset of this generator,
      or an argument is out of range; nothing has been written.
  """
  start = time.perf_counter()
  out_dir = Path(out_dir)
  _check_arguments(num_subjects, seed, workers, options, variety)
  target = atomic.real_target(out_dir)
  atomic.clean_stale(target)
  check_output_dir(out_dir)
  knees, tasks = plan(num_subjects, seed, variety, **options)
  if workers is None:
    workers = os.cpu_count() or 1
  work = None
  try:
    work = atomic.new_partial(target)
    size = _write(work, knees, tasks, workers, show_progress)
    settings = {'generator': PROGRAM, 'num_subjects': num_subjects,
                'seed': seed, 'variety': variety, 'options': options,
                'knees': len(knees),
                'images': len(tasks)}
    (work / SETTINGS).write_text(
        json.dumps(settings, indent=2, sort_keys=True, default=str) + '\n',
        encoding='utf-8')
    atomic.publish(work, target)
  except BaseException:  # Ctrl-C included: no partial folder stays
    atomic.discard_own(target)
    raise
  return {'knees': len(knees), 'images': len(tasks), 'subjects': num_subjects,
          'seconds': round(time.perf_counter() - start, 2), 'bytes': size}


def _write(out_dir: Path, knees: pd.DataFrame, tasks: list[ImageTask],
           workers: int, show_progress: bool) -> int:
  """Writes the images and tables into `out_dir`; returns the images' bytes."""
  points = np.zeros((len(tasks), len(schema.SIDES), schema.NUM_LANDMARKS, 2))
  progress = tqdm.tqdm(_run(tasks, out_dir, workers), total=len(tasks),
                       unit='image', desc='generating radiographs',
                       disable=not show_progress)
  for index, p in progress:
    points[index] = p

  columns = list(schema.MANIFEST_COLUMNS) + schema.reader_columns(
      knees.columns)
  knees[columns].to_csv(out_dir / MANIFEST, index=False)
  coords = pd.DataFrame(points.reshape(len(knees), -1).round(3),
                        columns=list(schema.LANDMARK_COLUMNS[3:]))
  pd.concat([knees[list(schema.ID_COLUMNS)], coords], axis=1).to_csv(
      out_dir / LANDMARKS, index=False)
  truth = knees[list(schema.ID_COLUMNS) + ['site']].copy()
  for name in schema.GRADES:
    truth[name] = knees['true_' + name]
  truth['severity'] = knees['severity'].round(4)
  truth[['jsw_l_mm', 'jsw_m_mm']] = knees[['jsw_l_mm', 'jsw_m_mm']].round(3)
  truth.to_csv(out_dir / TRUTH, index=False)
  return sum((out_dir / t.path).stat().st_size for t in tasks)


def _scales(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(',') if v.strip())


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """The command: generates the dataset, prints and returns its summary."""
  parser = argparse.ArgumentParser(prog=f'python -m {PROGRAM}',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--num_subjects', type=int, default=DEFAULT_NUM_SUBJECTS)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workers', type=int, default=None)
  parser.add_argument('--reader_noise', type=float, default=None,
                      help='reader error scale (default: kappa ~0.8)')
  parser.add_argument('--ungraded_fraction', type=float, default=None,
                      help='share of subjects without grades')
  parser.add_argument('--readers', type=_scales, default=None,
                      help='error scales of the further readers r1, r2, ..., '
                      "comma-separated; '' for none (default: 0.3,0.4,0.5)")
  parser.add_argument('--variety', type=float, default=1.0,
                      help='spread of knee pose, exposure and collimation, '
                      f'1 (standard) to {MAX_VARIETY:g}')
  args = parser.parse_args(argv)
  options = {k: getattr(args, k)
             for k in ('reader_noise', 'ungraded_fraction', 'readers')
             if getattr(args, k) is not None}
  summary = generate(args.out, num_subjects=args.num_subjects, seed=args.seed,
                     workers=args.workers, variety=args.variety,
                     **options)
  print(json.dumps(summary))
  return summary


if __name__ == '__main__':
  cli.run(PROGRAM, main)
