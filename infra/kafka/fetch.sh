#!/usr/bin/env bash
# Fetch one Apache Kafka release (broker, KRaft storage tool, console tools, log4j2 binding) from
# Maven Central into a cache outside the repository, and print the libs directory on stdout.
#
#   bash infra/kafka/fetch.sh [--version V] [--cache-dir DIR]
#
# Layout: DIR/<version>/libs/*.jar and DIR/<version>/.fetched (the sha256 of pom.xml that produced
# libs). A later call with the same pom.xml finds the marker and returns at once, without Maven.
# Maven's own local repository (~/.m2) is reused, so a refetch of a dropped cache is quick too.
#
# Defaults: --version is pom.xml's kafka.version; --cache-dir is $SITN_KAFKA_CACHE_DIR, else
# ${SITN_CACHE_DIR:-~/.cache/sitn-stream}/kafka. Needs java (17+) and mvn on PATH.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pom="$here/pom.xml"
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)
cache=${SITN_KAFKA_CACHE_DIR:-${SITN_CACHE_DIR:-$HOME/.cache/sitn-stream}/kafka}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --cache-dir) cache=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fetch.sh: unknown argument '$1' (allowed: --version V, --cache-dir DIR)" >&2; exit 2 ;;
  esac
done

if [[ ! $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "fetch.sh: Kafka version '$version' is not of the form X.Y.Z" >&2
  exit 2
fi

dest="$cache/$version"
libs="$dest/libs"
marker="$dest/.fetched"
pom_sha=$(sha256sum "$pom" | cut -d' ' -f1)

if [[ -f "$marker" && "$(cat "$marker")" == "$pom_sha" && -d "$libs" ]]; then
  echo "$libs"
  exit 0
fi

for tool in java mvn; do
  if ! command -v "$tool" >/dev/null; then
    echo "fetch.sh: '$tool' is not on PATH; install a JDK 17+ and Maven (apt-get install openjdk-17-jdk-headless maven)" >&2
    exit 3
  fi
done

echo "fetch.sh: fetching Apache Kafka $version from Maven Central into $libs" >&2
mkdir -p "$dest"
staging=$(mktemp -d "$dest/libs.tmp.XXXXXX")
trap 'rm -rf "$staging"' EXIT
# --batch-mode: no colour codes or progress bars in CI logs. -q keeps the output to errors only.
mvn --batch-mode -q -Dstyle.color=never -f "$pom" -Dkafka.version="$version" \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$staging" 2>&1 \
  | sed 's/\x1b\[[0-9;]*m//g' >&2  # Maven 3.8 prints colour resets even in batch mode
if ! ls "$staging"/kafka_2.13-"$version".jar >/dev/null 2>&1; then
  echo "fetch.sh: Maven finished but kafka_2.13-$version.jar is missing from $staging" >&2
  exit 4
fi
rm -rf "$libs"
mv "$staging" "$libs"
echo "$pom_sha" > "$marker"
echo "$libs"
