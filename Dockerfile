# Tidegate: one image for the gateway (`tidegate gateway`) and the operator
# (`tidegate operator`). Builds alike with BuildKit (docker buildx build) and with buildah
# (buildah bud); docs/image.md says how, and hack/image.sh builds it for the tests.
#
# BASE_IMAGE: any Debian-like image with python3 (3.11) and its venv module. The default is
# the official slim Python image; the tests pass a base made from Debian's packages.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- deps: only the locked, hashed dependencies (cached until requirements.lock changes)
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# pip trusts the system CA bundle (a build may mount the host's over it, see docs/image.md).
# Wheels only: the base needs no compiler, and every file is checked against the lock's hash.
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m venv /opt/tidegate \
    && /opt/tidegate/bin/pip install --cert /etc/ssl/certs/ca-certificates.crt \
        --require-hashes --only-binary :all: --no-deps -r /tmp/requirements.lock

# ---- build: the project itself, with the locked setuptools, no network
FROM deps AS build
WORKDIR /src
# README.m[d]: the readme is optional for the build context.
COPY pyproject.toml README.m[d] ./
# src/tidegate/{gateway,operator} are symlinks to the top-level folders: copy those too.
COPY src ./src
COPY gateway ./gateway
COPY operator ./operator
# A regular (non-editable) install that copies the files into site-packages; then the
# build-only tools leave the runtime environment; the bytecode is compiled now, because
# the root filesystem is read-only at run time.
RUN /opt/tidegate/bin/pip install --no-index --no-deps --no-build-isolation /src \
    && /opt/tidegate/bin/pip uninstall --yes setuptools \
    && /opt/tidegate/bin/python -m compileall -q /opt/tidegate/lib

# ---- runtime
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tidegate" \
      org.opencontainers.image.description="Kubernetes egress gateway: a domain-allowlisting HTTP proxy and its operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 65532 gets a name: getpass/pwd lookups (kopf's default peer identity when POD_ID
# is unset) fail with KeyError for a uid that /etc/passwd does not know.
RUN echo "tidegate:x:65532:65532:tidegate:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "tidegate:x:65532:" >> /etc/group
COPY --from=build /opt/tidegate /opt/tidegate
ENV PATH=/opt/tidegate/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Nothing is written outside /tmp (an emptyDir in both Deployments): the root filesystem
# can be mounted read-only.
USER 65532:65532
WORKDIR /tmp
EXPOSE 3128 9090
ENTRYPOINT ["tidegate"]
CMD ["--help"]
