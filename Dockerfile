# The monitor as a container: run one per vantage point.
#
#   docker build -t probe .
#   docker run -d --name probe -p 9516:9516 -e PROBE_VANTAGE=cn-shanghai-telecom \
#       -v "$PWD/targets.yml:/etc/probe/targets.yml:ro" probe
#
# The config is read from /etc/probe/targets.yml (PROBE_CONFIG); the image ships the
# repository's targets.yml there as a working default, so mount your own over it.
# Set PROBE_VANTAGE: the default vantage name is the host name, which in a container is
# its random id. `docker kill -s HUP probe` reloads the config; `docker run ... probe
# check` validates it. The health check assumes the default listen port 9516.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PROBE_CONFIG=/etc/probe/targets.yml

# A fixed uid (user `probe`), numeric in USER so that runtimes can check it is not root;
# a mounted config only needs to be readable by uid 10001 (or by all).
RUN groupadd --system --gid 10001 probe \
    && useradd --system --uid 10001 --gid probe --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin probe

COPY pyproject.toml README.md /tmp/src/
COPY probe/ /tmp/src/probe/
RUN pip install --no-cache-dir /tmp/src && rm -rf /tmp/src

COPY targets.yml /etc/probe/targets.yml

USER 10001:10001
EXPOSE 9516

# No curl in slim images: the health check uses the image's own Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:9516/-/healthy', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["probe"]
CMD ["run"]
