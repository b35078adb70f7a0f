{{/* Names: <fullname> is the release name unless fullnameOverride is set. */}}
{{- define "ttt.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "ttt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The index StatefulSet and its headless Service share a name, so that pod i is
     <fullname>-index-i.<fullname>-index (what spec.retrieval.service points at). */}}
{{- define "ttt.index.name" -}}{{ include "ttt.fullname" . }}-index{{- end -}}

{{- define "ttt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ttt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ttt
{{- end -}}

{{- define "ttt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ttt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ttt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ttt.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is given (immutable), else repository:tag. */}}
{{- define "ttt.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Shards and replicas come from the run spec (the same numbers the pipelines use). */}}
{{- define "ttt.shards" -}}{{ int (default 1 .Values.run.spec.corpus.shards) }}{{- end -}}
{{- define "ttt.indexReplicas" -}}
{{- $index := default dict .Values.run.spec.index -}}
{{- int (default 1 $index.replicas) -}}
{{- end -}}
{{- define "ttt.evalWorkers" -}}
{{- $eval := default dict .Values.run.spec.eval -}}
{{- int (default 1 $eval.workers) -}}
{{- end -}}
{{- define "ttt.metricsPort" -}}
{{- $metrics := default dict .Values.run.spec.metrics -}}
{{- int (default 9090 $metrics.port) -}}
{{- end -}}

{{/* Environment shared by index servers and eval workers: secrets are files, and the
     spec overrides point the run at those files and at this release's index pods. */}}
{{- define "ttt.commonEnv" -}}
# torch's and FAISS's OpenMP threads: the container's CPU limit in whole cores (the node's
# allocatable cores without a limit), not one per node core, which oversubscribes a shared
# node and gets a limited container throttled.
- name: OMP_NUM_THREADS
  valueFrom:
    resourceFieldRef: {resource: limits.cpu, divisor: "1"}
- name: TTT_STORAGE__CREDENTIALSFILE
  value: /var/run/ttt/store
- name: TTT_STORAGE__CACHEDIR
  value: /var/cache/ttt
- name: TTT_RETRIEVAL__SERVICE
  value: {{ printf "%s.%s:%d" (include "ttt.index.name" .) (include "ttt.index.name" .) (int .Values.index.port) | quote }}
{{- end -}}

{{- define "ttt.commonVolumeMounts" -}}
- name: run-spec
  mountPath: /etc/ttt
  readOnly: true
- name: auth-token
  mountPath: /var/run/ttt/token
  readOnly: true
- name: store-credentials
  mountPath: /var/run/ttt/store
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: home-cache
  mountPath: /home/ttt/.cache
{{- end -}}

{{/* Volumes shared by index servers and eval workers. `store` is the Secret values entry
     of the store keys: the index servers get secrets.indexStore (read-only keys). */}}
{{- define "ttt.commonVolumes" -}}
{{- $store := .store -}}
{{- with .root -}}
- name: run-spec
  configMap:
    name: {{ include "ttt.fullname" . }}-run
- name: auth-token
  secret:
    secretName: {{ .Values.secrets.auth.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.secrets.auth.tokenKey }}
        path: token
- name: store-credentials
  secret:
    secretName: {{ $store.name }}
    defaultMode: 0440
    items:
      - key: {{ $store.accessKeyKey }}
        path: accesskey
      - key: {{ $store.secretKeyKey }}
        path: secretkey
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: home-cache
  emptyDir:
    sizeLimit: 2Gi
{{- end -}}
{{- end -}}

{{/* The run spec's checksum without its operational fields (ttt/spec/run.py OPERATIONAL_FIELDS:
     index.replicas, retrieval timeout/retries/servers/service/inProcess): scaling the
     servers or tuning retrieval changes neither the index pod template nor the eval Job. */}}
{{- define "ttt.runChecksum" -}}
{{- $run := deepCopy .Values.run -}}
{{- $spec := default dict $run.spec -}}
{{- if $spec.index }}{{ $_ := set $spec "index" (omit $spec.index "replicas") }}{{ end -}}
{{- if $spec.ttt }}{{ $_ := set $spec "ttt" (omit $spec.ttt "ensembleSize" "recompute") }}{{ end -}}
{{- if $spec.retrieval }}{{ $_ := set $spec "retrieval" (omit $spec.retrieval "timeoutSeconds" "retries" "servers" "service" "inProcess" "allowPartial" "minShards" "deadlineSeconds" "maxBackoffSeconds" "waitSeconds" "registryHosts") }}{{ end -}}
{{- toYaml $run | sha256sum -}}
{{- end -}}

{{/* Labels of a Prometheus Operator object: the chart's, `release: <monitoring.prometheusRelease>`
     (what kube-prometheus-stack's default selectors match), then the object's own `labels`
     (which win). Called with (list $ .Values.monitoring.<object>.labels). */}}
{{- define "ttt.monitorLabels" -}}
{{- $root := index . 0 -}}
{{- $labels := dict -}}
{{- with $root.Values.monitoring.prometheusRelease }}{{- $_ := set $labels "release" . -}}{{- end -}}
{{- $labels = merge (deepCopy (index . 1 | default dict)) $labels -}}
{{ include "ttt.labels" $root }}
{{- with $labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
