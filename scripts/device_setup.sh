#!/usr/bin/env bash
# On the lent GPU machine (its own python3 with torch and Triton): install the carried wheels in .whl/ of
# the packages its image lacks into /tmp/site, put that and the repository on PYTHONPATH, point
# SAM_SPARSE_CACHE at carried weights (.whl/cache/mobile_sam.pt) and record what the image has in
# $OUT/pip_list.txt. Source it: . scripts/device_setup.sh
mkdir -p /tmp/site
python3 - <<'PY'
import glob, importlib.metadata as md, os, re, subprocess, sys
have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()}
out = os.environ.get("OUT", "/tmp")
with open(os.path.join(out, "pip_list.txt"), "w") as f:
    f.write("\n".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions())))
wheels = [w for w in glob.glob(".whl/*.whl")
          if re.sub(r"[-_.]+", "-", os.path.basename(w).split("-")[0]).lower() not in have]
print("installing", [os.path.basename(w) for w in wheels], flush=True)
if wheels:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", "/tmp/site", *wheels], check=True)
PY
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -f .whl/cache/mobile_sam.pt ] && export SAM_SPARSE_CACHE=$PWD/.whl/cache
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader
