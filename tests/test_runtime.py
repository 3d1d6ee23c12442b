"""koajax.runtime: the compilation cache a run keeps across processes."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process (JAX reads its cache settings once): configure the host as
# koajax.main does, compile one program, print where the cache went.
_PROGRAM = textwrap.dedent('''
    import sys
    import ml_collections
    from koajax import calibrate
    calibrate.configure_host(
        ml_collections.ConfigDict({'compilation_cache': sys.argv[1]}))
    import jax
    import jax.numpy as jnp
    jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()
    print(jax.config.jax_compilation_cache_dir)
''')


def _run(directory, **env):
  base = {k: v for k, v in os.environ.items()
          if k != 'JAX_COMPILATION_CACHE_DIR'}
  base.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              PYTHONPATH=REPO, **env)
  out = subprocess.run([sys.executable, '-c', _PROGRAM, str(directory)],
                       env=base, capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_compiled_programs_are_kept_in_the_configured_directory(tmp_path):
  cache = tmp_path / 'nested' / 'jax'
  assert _run(cache) == str(cache)
  assert any(cache.iterdir())  # created and written


def test_an_explicit_environment_setting_wins(tmp_path):
  ours, theirs = tmp_path / 'ours', tmp_path / 'theirs'
  assert _run(ours, JAX_COMPILATION_CACHE_DIR=str(theirs)) == str(theirs)
  assert not ours.exists() and any(theirs.iterdir())


def test_an_empty_setting_keeps_no_cache(tmp_path):
  assert _run('') in ('', 'None')
