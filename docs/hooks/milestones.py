"""MkDocs hook: the chapters are pages of the site where they live in the repository.

Each chapter is written once, next to its stage, as milestones/NN/README.md, so that it reads on
GitHub too. This hook adds those chapters to the site as pages at milestones/NN/, and the files
next to them (result JSON, logs, pictures, and the run folders under milestones/runs/) as
static files at the same paths; docs/assets/ is also reachable as docs/assets/. So a relative
link in a chapter, `../01/timeline-h100-043b376f-course-20261125-213914.png` or
`../../docs/assets/stages.png`, resolves the same way on the site as on GitHub, and a broken one
fails `mkdocs build --strict`.
"""

from pathlib import Path

from mkdocs.structure.files import File, Files

STATIC = {".png", ".svg", ".json", ".log"}


def repo_files(root: Path) -> list[Path]:
    chapters = sorted((root / "milestones").glob("[0-9][0-9]/README.md"))
    static = [p for p in sorted((root / "milestones").rglob("*")) if p.suffix in STATIC]
    assets = [p for p in sorted((root / "docs" / "assets").glob("*")) if p.suffix in STATIC]
    return chapters + static + assets


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent
    for path in repo_files(root):
        files.append(File(path.relative_to(root).as_posix(), str(root), config.site_dir,
                          config.use_directory_urls))
    return files
