#!/usr/bin/env bash
# Install the faceattend edge agent on a JetPack host, without a container, as the systemd service
# faceattend-edge (deploy/jetson/faceattend-edge.service).
#
#   sudo deploy/jetson/install.sh --bundle DIR [--source DIR] [--no-start]
#   deploy/jetson/install.sh --bundle DIR --stage ROOT        # lay the files out under ROOT only (packaging, tests)
#
#   --bundle DIR   what `enrollment-server provision-device` made for this device (edge.yaml, mqtt.password,
#                  ca.crt, gallery-signing.pub.pem)
#   --source DIR   the faceattend source tree to install (default: this script's repository)
#   --no-start     install and enable, but do not start (e.g. cameras not yet connected)
#   --stage ROOT   install config, unit and state directory under ROOT; no user, no pip, no systemctl
#
# Needs JetPack's TensorRT Python bindings (python3-libnvinfer, part of `nvidia-jetpack`) and CUDA (for pycuda).
# Layout: /opt/faceattend/venv (the agent), /etc/faceattend (the bundle: root:faceattend, secrets 0640),
# /var/lib/faceattend (outbox, gallery, snapshots, engine cache: faceattend, 0750).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/../.." && pwd)
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

bundle=""
stage=""
start=1
while [ $# -gt 0 ]; do
    case $1 in
        --bundle) bundle=${2:?--bundle needs a directory}; shift 2 ;;
        --source) source_dir=${2:?--source needs a directory}; shift 2 ;;
        --stage) stage=${2:?--stage needs a directory}; shift 2 ;;
        --no-start) start=0; shift ;;
        -h|--help) usage ;;
        *) echo "install: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$bundle" ] || usage
for f in edge.yaml mqtt.password ca.crt gallery-signing.pub.pem; do
    [ -f "$bundle/$f" ] || { echo "install: $bundle/$f is missing: is this a provisioned bundle?" >&2; exit 2; }
done

root=${stage%/}
etc=$root/etc/faceattend
state=$root/var/lib/faceattend
venv=$root/opt/faceattend/venv
unit_dir=$root/etc/systemd/system
group=faceattend

log() { echo "install: $*"; }

if [ -z "$stage" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "install: run as root (sudo), or use --stage" >&2; exit 2; }
    if [ ! -f /etc/nv_tegra_release ]; then
        log "warning: /etc/nv_tegra_release not found: this does not look like a JetPack host"
    fi
    python3 - <<'EOF' || { echo "install: Python >= 3.10 is needed (JetPack 6)" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
    if ! python3 -c "import tensorrt" 2>/dev/null; then
        log "warning: TensorRT's Python bindings are missing (apt install nvidia-jetpack, or python3-libnvinfer);"
        log "         the agent can still run with models.backend: onnxruntime"
    fi
    if ! getent passwd faceattend >/dev/null; then
        useradd --system --home-dir /var/lib/faceattend --shell /usr/sbin/nologin --user-group faceattend
        log "created system user faceattend"
    fi
    for g in video render; do
        if getent group "$g" >/dev/null; then usermod --append --groups "$g" faceattend; fi
    done

    log "installing the agent into /opt/faceattend/venv (TensorRT from the system's site-packages)"
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # numpy<2: JetPack's TensorRT bindings are built against numpy 1.x; pycuda builds against /usr/local/cuda
    PATH=/usr/local/cuda/bin:$PATH "$venv/bin/pip" install --quiet "${source_dir}[edge]" "numpy<2" "pycuda>=2022.2"
fi

# the bundle: config and secrets readable by the agent's group only
install -d -m 0750 "$etc"
if [ -f "$etc/edge.yaml" ] && ! cmp -s "$bundle/edge.yaml" "$etc/edge.yaml"; then
    cp -p "$etc/edge.yaml" "$etc/edge.yaml.bak"
    log "kept the previous config as $etc/edge.yaml.bak"
fi
install -m 0640 "$bundle/edge.yaml" "$etc/edge.yaml"
install -m 0640 "$bundle/mqtt.password" "$etc/mqtt.password"
install -m 0644 "$bundle/ca.crt" "$etc/ca.crt"
install -m 0644 "$bundle/gallery-signing.pub.pem" "$etc/gallery-signing.pub.pem"
install -d -m 0750 "$state" "$state/cache"
install -d -m 0755 "$unit_dir"
install -m 0644 "$here/faceattend-edge.service" "$unit_dir/faceattend-edge.service"

if [ -n "$stage" ]; then
    log "staged under $root (no user, packages or service changes)"
    exit 0
fi

chown -R root:"$group" "$etc"
chown -R faceattend:"$group" "$state"
log "checking the configuration as the service user"
runuser -u faceattend -- "$venv/bin/edge-agent" check-config "$etc/edge.yaml"

systemctl daemon-reload
systemctl enable faceattend-edge.service
if [ "$start" -eq 1 ]; then
    log "starting: the first start builds the TensorRT engines (minutes); follow with journalctl -fu faceattend-edge"
    systemctl restart faceattend-edge.service
fi
log "done. Remove the bundle copy ($bundle): its password is now in $etc/mqtt.password"
