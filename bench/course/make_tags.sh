#!/usr/bin/env bash
# Tag each milestone: a commit whose message ends with the trailer line
#     Milestone: v0.3-paged-kv
# gets the tag v0.3-paged-kv and the short alias v0.3, so `git diff v0.2 v0.3 --stat` works.
# Idempotent: a tag that exists is never moved; if it points elsewhere, that is reported.
# Tags are lightweight so that this needs no git identity (CI has none).
set -euo pipefail
if ! top=$(git rev-parse --show-toplevel 2>/dev/null); then
  echo "not a git checkout: no stage tags to make"
  exit 0
fi
cd "$top"

if ! git rev-parse -q --verify HEAD >/dev/null; then
  echo "no commits yet: nothing to tag"
  exit 0
fi

made=0
declare -A seen=()

# ensure_tag NAME COMMIT: create NAME at COMMIT unless a tag NAME already exists.
ensure_tag() {
  local name=$1 commit=$2 existing
  if existing=$(git rev-parse -q --verify "refs/tags/$name^{commit}"); then
    if [[ $existing != "$commit" ]]; then
      echo "kept $name at ${existing:0:12}; the newest commit with this milestone is" \
        "${commit:0:12} (delete the tag and rerun to move it)"
    fi
    return
  fi
  git tag "$name" "$commit"
  echo "made $name -> ${commit:0:12} $(git log -1 --format=%s "$commit")"
  made=$((made + 1))
}

# Newest first: when several commits carry the same milestone, the latest one is the milestone.
while IFS=$'\t' read -r commit milestones; do
  for milestone in $milestones; do
    if [[ ! $milestone =~ ^v[0-9]+\.[0-9]+-[A-Za-z0-9._-]+$ ]]; then
      echo "skipped '$milestone' on ${commit:0:12}: a milestone reads vX.Y-name" >&2
      continue
    fi
    [[ -n ${seen[$milestone]:-} ]] && continue
    seen[$milestone]=1
    ensure_tag "$milestone" "$commit"
    ensure_tag "${milestone%%-*}" "$commit"
  done
done < <(git log --format='%H%x09%(trailers:key=Milestone,valueonly,separator=%x20)')

if ((made == 0)); then
  : # nothing new: stay quiet, `make venv` runs this every time
else
  echo "made $made tag(s)"
fi
