"""mkdocs hooks: the README is the home page, the changelog and benchmark
results are pages.

The README and ``docs/*.md`` link to files by their paths in the repository
(``docs/flax.md``, ``benchmarks/results/results.md``), as GitHub renders them;
here the README becomes ``index.md``, ``benchmarks/results/`` is published
under ``results/``, and those links are rewritten to the site's paths.
"""

import pathlib
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / 'benchmarks' / 'results'


def on_files(files, config):
  files.append(File.generated(config, 'index.md',
                              abs_src_path=str(ROOT / 'README.md')))
  files.append(File.generated(config, 'changelog.md',
                              abs_src_path=str(ROOT / 'CHANGELOG.md')))
  for path in sorted(RESULTS.rglob('*')):
    if path.suffix in ('.md', '.png'):
      rel = path.relative_to(RESULTS).as_posix()
      files.append(File.generated(config, f'results/{rel}',
                                  abs_src_path=str(path)))
  return files


def on_page_markdown(markdown, page, config, files):
  src = page.file.src_uri
  if src == 'index.md':
    markdown = re.sub(r'\]\(docs/', '](', markdown)
    markdown = re.sub(r'\]\(benchmarks/results/', '](results/', markdown)
    markdown = re.sub(r'\]\(CHANGELOG\.md', '](changelog.md', markdown)
  elif src == 'changelog.md':
    markdown = re.sub(r'\]\(README\.md', '](index.md', markdown)
  elif '/' not in src:
    markdown = re.sub(r'\]\(\.\./benchmarks/results/', '](results/', markdown)
  return markdown
