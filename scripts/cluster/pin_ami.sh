#!/usr/bin/env bash
# Freeze cluster.yaml's image at the release gpu_stack.sh pins: its AMI id in the cluster's
# region (ids are per region, so cluster.yaml cannot ship one) goes into the `ImageId: &dlami`
# line every node type shares. Run once with your AWS credentials before `ray up`.
# Usage: scripts/cluster/pin_ami.sh [--region REGION (the config's)] [--config cluster.yaml]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=$HERE/../../cluster.yaml REGION=""
while (( $# )); do
    case "$1" in
        --region|--config)
            (( $# >= 2 )) || { echo "pin_ami.sh: $1 needs a value" >&2; exit 2; }
            if [[ "$1" == --region ]]; then REGION=$2; else CONFIG=$2; fi
            shift 2 ;;
        *) echo "pin_ami.sh: unknown argument '$1' (see its head)" >&2; exit 2 ;;
    esac
done
[[ -f "$CONFIG" ]] || { echo "pin_ami.sh: no cluster config at $CONFIG" >&2; exit 2; }
source "$HERE/gpu_stack.sh"  # shellcheck source=gpu_stack.sh
if [[ -z "$REGION" ]]; then
    REGION=$(sed -n 's/^  region: *\([a-z0-9-]*\).*/\1/p' "$CONFIG" | head -n 1)
fi
[[ -n "$REGION" ]] || { echo "pin_ami.sh: no region in $CONFIG (give --region)" >&2; exit 2; }
grep -q '^ *ImageId: &dlami ' "$CONFIG" \
    || { echo "pin_ami.sh: $CONFIG has no 'ImageId: &dlami' line to pin" >&2; exit 2; }
command -v aws >/dev/null \
    || { echo "pin_ami.sh: the aws CLI is not installed (it looks the image up)" >&2; exit 2; }

ids=$(aws ec2 describe-images --region "$REGION" --owners amazon --output text \
          --filters "Name=name,Values=$RAYTRAIN_AT_DLAMI_NAME" --query 'Images[].ImageId') \
    || { echo "pin_ami.sh: aws ec2 describe-images failed in $REGION (output above)" >&2
         exit 1; }
read -r -a found <<< "$ids"
if (( ${#found[@]} != 1 )) || [[ ! "${found[0]}" =~ ^ami-[0-9a-f]+$ ]]; then
    echo "pin_ami.sh: EC2 in $REGION names ${#found[@]} image(s) called" \
         "'$RAYTRAIN_AT_DLAMI_NAME' (${ids:-none}); $CONFIG is unchanged" >&2
    exit 1
fi
# Through a file beside the config: a failure leaves it as it was.
tmp=$(mktemp "$CONFIG.XXXXXX")
trap 'rm -f "$tmp"' EXIT
sed "s|^\( *ImageId: &dlami \).*|\1${found[0]}   # release $RAYTRAIN_AT_DLAMI_RELEASE in $REGION (pin_ami.sh)|" \
    "$CONFIG" > "$tmp"
chmod --reference="$CONFIG" "$tmp" && mv "$tmp" "$CONFIG"
trap - EXIT
echo "[pin_ami] $CONFIG: ImageId ${found[0]} ($RAYTRAIN_AT_DLAMI_NAME, $REGION)"
