"""TFDS builders for knee datasets that need registration (OAI, MOST).

Importing a builder module registers it with TFDS:

  import tensorflow_datasets as tfds
  from koajax.datasets.oai import oai_dataset_builder  # registers 'oai'

  builder = tfds.builder('oai')  # or oai_dataset_builder.Builder()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))
  knees = builder.as_data_source()['train']  # random access, no TensorFlow

What goes in MANUAL is in each builder's MANUAL_DOWNLOAD_INSTRUCTIONS; the
shared parts are in `koajax.datasets.knee_builder`.
"""
