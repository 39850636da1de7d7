{{- define "tally.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "tally.labels" -}}
app.kubernetes.io/name: tally
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Pod selector of one component: (dict "root" $ "component" "gateway") */}}
{{- define "tally.selector" -}}
app.kubernetes.io/name: tally
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The job label Prometheus gives the component's series, as in deploy/prometheus/prometheus.yml. */}}
{{- define "tally.job" -}}tally-{{ .component }}{{- end -}}

{{- define "tally.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tally.kafkaCluster" -}}
{{ .Values.kafka.strimzi.clusterName | default (printf "%s-kafka" (include "tally.fullname" .)) }}
{{- end -}}

{{- define "tally.kafkaBootstrap" -}}
{{- if .Values.kafka.strimzi.enabled -}}{{ include "tally.kafkaCluster" . }}-kafka-bootstrap:9092
{{- else -}}{{ required "kafka.bootstrap is required when kafka.strimzi.enabled is false" .Values.kafka.bootstrap }}
{{- end -}}
{{- end -}}

{{/* Topic names as tally/schemas/topics.py makes them: (dict "root" $ "topic" "events") */}}
{{- define "tally.topic" -}}{{ .root.Values.topics.prefix }}tally.{{ .topic }}.v1{{- end -}}

{{- define "tally.pgCluster" -}}{{ include "tally.fullname" . }}-postgres{{- end -}}

{{/* Environment shared by every Tally process: the ConfigMap, then database, Redis and secrets from Secrets. */}}
{{- define "tally.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "tally.fullname" . }}
env:
{{- if .Values.postgres.cnpg.enabled }}
  - name: PGUSER
    valueFrom: {secretKeyRef: {name: {{ include "tally.pgCluster" . }}-app, key: username}}
  - name: PGPASSWORD
    valueFrom: {secretKeyRef: {name: {{ include "tally.pgCluster" . }}-app, key: password}}
  - name: TALLY_DATABASE_URL
    {{- $host := ternary (printf "%s-pooler" (include "tally.pgCluster" .)) (printf "%s-rw" (include "tally.pgCluster" .)) .Values.postgres.cnpg.pooler.enabled }}
    value: {{ printf "postgresql://$(PGUSER):$(PGPASSWORD)@%s:5432/%s?sslmode=require" $host .Values.postgres.cnpg.database | quote }}
{{- else }}
  - name: TALLY_DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ required "postgres.existingSecret is required when postgres.cnpg.enabled is false" .Values.postgres.existingSecret }}
        key: {{ .Values.postgres.existingSecretKey }}
{{- end }}
{{- if .Values.redis.enabled }}
  - name: TALLY_REDIS_URL
    value: {{ printf "redis://%s-redis:6379/0" (include "tally.fullname" .) | quote }}
{{- else if .Values.redis.existingSecret }}
  - name: TALLY_REDIS_URL
    valueFrom:
      secretKeyRef: {name: {{ .Values.redis.existingSecret }}, key: {{ .Values.redis.existingSecretKey }}}
{{- else }}
  - name: TALLY_REDIS_URL
    value: {{ required "redis.url or redis.existingSecret is required when redis.enabled is false" .Values.redis.url | quote }}
{{- end }}
{{- range $name, $key := .Values.secrets.keys }}
  - name: {{ $name }}
    valueFrom:
      secretKeyRef:
        name: {{ $.Values.secrets.existingSecret }}
        key: {{ $key }}
        optional: {{ $.Values.secrets.optional }}
{{- end }}
{{- end -}}

{{/* Pod-level fields shared by every Tally pod. */}}
{{- define "tally.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{ toYaml . | nindent 2 }}
{{- end }}
securityContext: {{ toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{ toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A worker Deployment: (dict "root" $ "component" "jobs" "command" "jobs" "values" .Values.jobs); with
"scaled" true the replica count is left to the autoscaler. */}}
{{- define "tally.worker" -}}
{{- $root := .root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tally.fullname" $root }}-{{ .component }}
  labels:
    {{- include "tally.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if not .scaled }}
  replicas: {{ .values.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "tally.selector" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tally.selector" . | nindent 8 }}
        tally-job: {{ include "tally.job" . }}
    spec:
      {{- include "tally.podSpec" $root | trim | nindent 6 }}
      terminationGracePeriodSeconds: 60
      containers:
        - name: {{ .component }}
          image: {{ include "tally.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: [tally, {{ .command }}]
          {{- include "tally.env" $root | nindent 10 }}
          ports:
            - {name: metrics, containerPort: {{ .values.metricsPort }}}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
          securityContext: {{ toYaml $root.Values.securityContext | nindent 12 }}
          resources: {{ toYaml .values.resources | nindent 12 }}
      volumes:
        - {name: tmp, emptyDir: {}}
{{- end -}}
