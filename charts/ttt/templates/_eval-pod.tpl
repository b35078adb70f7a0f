{{/* The eval pod template: its hash names the Job, so a changed template makes a new Job
     (a Job's template is immutable) and an unchanged one leaves the running Job alone. */}}
{{- define "ttt.eval.podTemplate" -}}
{{- $workers := int (include "ttt.evalWorkers" .) -}}
metadata:
  labels:
    {{- include "ttt.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: eval
    ttt.dev/run: {{ .Values.run.metadata.name | quote }}
  annotations:
    checksum/run: {{ include "ttt.runChecksum" . }}
    {{- with .Values.eval.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "ttt.serviceAccountName" . }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  initContainers:
    # Start only once every shard has a ready server, found as the worker finds them
    # (spec.retrieval.service): a worker that started earlier would begin with partial
    # retrievals. /readyz needs no token.
    - name: wait-for-index
      image: {{ include "ttt.image" (dict "root" . "image" .Values.images.eval) }}
      imagePullPolicy: {{ .Values.images.eval.pullPolicy }}
      command: ["python", "-m", "ttt.index.wait", "--spec", "/etc/ttt/run.yaml", "--timeout", {{ .Values.eval.waitForIndexSeconds | quote }}]
      env:
        {{- include "ttt.commonEnv" . | nindent 8 }}
      resources:
        requests: {cpu: 10m, memory: 64Mi}
        limits: {cpu: 200m, memory: 512Mi}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "ttt.commonVolumeMounts" . | nindent 8 }}
  containers:
    - name: eval
      image: {{ include "ttt.image" (dict "root" . "image" .Values.images.eval) }}
      imagePullPolicy: {{ .Values.images.eval.pullPolicy }}
      args: ["eval", "--spec", "/etc/ttt/run.yaml"]
      env:
        # The client reads the bearer token from the mounted Secret file, so the token
        # never appears in the pod spec.
        - name: TTT_AUTH_TOKEN_FILE
          value: /var/run/ttt/token/token
        # The rank is JOB_COMPLETION_INDEX, which Kubernetes sets in an Indexed Job.
        - name: WORLD_SIZE
          value: {{ $workers | quote }}
        # Prometheus scrapes the worker from outside the pod, so not loopback.
        - name: TTT_METRICS_ADDR
          value: "0.0.0.0"
        # Pushed models (s3://...) are fetched, verified, into the sized models volume.
        - name: TTT_MODELS_CACHE
          value: /var/cache/ttt-models
        {{- include "ttt.commonEnv" . | nindent 8 }}
      ports:
        - name: metrics
          containerPort: {{ include "ttt.metricsPort" . }}
          protocol: TCP
      resources:
        {{- $res := deepCopy .Values.eval.resources }}
        {{- if .Values.eval.gpu.enabled }}
        {{- $gpu := dict .Values.eval.gpu.resourceName (int .Values.eval.gpu.count) }}
        {{- $_ := set $res "limits" (merge (default dict $res.limits) $gpu) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "ttt.commonVolumeMounts" . | nindent 8 }}
        - name: scratch
          mountPath: /var/cache/ttt
        - name: models
          mountPath: /var/cache/ttt-models
  volumes:
    {{- include "ttt.commonVolumes" (dict "root" . "store" .Values.secrets.store) | nindent 4 }}
    - name: scratch
      emptyDir:
        sizeLimit: {{ .Values.eval.scratch.sizeLimit }}
    - name: models
      {{- if .Values.models.cache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.models.cache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.models.cache.sizeLimit }}
      {{- end }}
  {{- with .Values.eval.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.eval.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.eval.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}{{- end -}}
