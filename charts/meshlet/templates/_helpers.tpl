{{/*
Names. The objects' names are part of meshlet's contract (the sidecars and the control plane
look them up), so they do not follow the release name.
*/}}
{{- define "meshlet.name" -}}meshlet{{- end -}}
{{- define "meshlet.control" -}}meshlet-control{{- end -}}
{{- define "meshlet.jaeger" -}}meshlet-jaeger{{- end -}}

{{- define "meshlet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Recommended labels. Call with (dict "ctx" $ "component" "control-plane").
*/}}
{{- define "meshlet.labels" -}}
{{ include "meshlet.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meshlet
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "meshlet.chart" .ctx }}
{{- end -}}

{{- define "meshlet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshlet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Images.
*/}}
{{- define "meshlet.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "meshlet.proxyImage" -}}
{{- default (include "meshlet.image" .) .Values.proxyImage -}}
{{- end -}}

{{/*
Where injected sidecars export traces; empty when tracing is off.
*/}}
{{- define "meshlet.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint -}}
{{- .Values.tracing.otlpEndpoint -}}
{{- else if .Values.tracing.jaeger.enabled -}}
{{- printf "http://%s.%s.svc:4317" (include "meshlet.jaeger" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
A PEM "EC PRIVATE KEY" (SEC1, as Sprig's genPrivateKey "ecdsa" writes it) of a P-256 key,
rewrapped as PKCS#8 ("PRIVATE KEY"), the format meshlet documents for its CA key files.
Go's SEC1 encoding of a P-256 key is always 121 bytes, so the PKCS#8 header is fixed:
SEQUENCE(147) { INTEGER 0, SEQUENCE { OID ecPublicKey, OID prime256v1 }, OCTET STRING(121) }.
*/}}
{{- define "meshlet.ecPkcs8" -}}
{{- $body := . | replace "-----BEGIN EC PRIVATE KEY-----" "" | replace "-----END EC PRIVATE KEY-----" "" | nospace -}}
{{- $sec1 := b64dec $body -}}
{{- if ne (len $sec1) 121 -}}
{{- fail "meshlet: the generated CA key is not a 121-byte SEC1 P-256 key; set ca.bundle/issuerCert/issuerKey instead" -}}
{{- end -}}
{{- $header := b64dec "MIGTAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHk=" -}}
{{- $der := b64enc (printf "%s%s" $header $sec1) -}}
-----BEGIN PRIVATE KEY-----
{{ regexReplaceAll "(.{64})" $der "${1}\n" | trimSuffix "\n" }}
-----END PRIVATE KEY-----
{{ end -}}

{{/*
Checks that need no rendered object, included by the Deployment.
*/}}
{{- define "meshlet.validate" -}}
{{- if and (eq .Values.injection.mode "native") (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "meshlet: injection.mode=native needs Kubernetes 1.29 or later (native sidecars); this cluster is %s: set injection.mode=container" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- $ca := .Values.ca -}}
{{- if and (not $ca.existingSecret) (or $ca.bundle $ca.issuerCert $ca.issuerKey) (not (and $ca.bundle $ca.issuerCert $ca.issuerKey)) -}}
{{- fail "meshlet: ca.bundle, ca.issuerCert and ca.issuerKey go together (or set none of them to generate a CA)" -}}
{{- end -}}
{{- if ne (empty $ca.rootCert) (empty $ca.rootKey) -}}
{{- fail "meshlet: ca.rootCert and ca.rootKey go together" -}}
{{- end -}}
{{- $tls := .Values.webhook.tls -}}
{{- if $tls.existingSecret -}}
{{- if not $tls.caBundle -}}
{{- fail "meshlet: webhook.tls.existingSecret needs webhook.tls.caBundle (the CA the API server trusts for the webhook)" -}}
{{- end -}}
{{- else if or $tls.cert $tls.key $tls.caBundle -}}
{{- if not (and $tls.cert $tls.key $tls.caBundle) -}}
{{- fail "meshlet: webhook.tls.cert, webhook.tls.key and webhook.tls.caBundle go together" -}}
{{- end -}}
{{- end -}}
{{- end -}}
