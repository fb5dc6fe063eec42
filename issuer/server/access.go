package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"blindperso/api"
)

// caller returns the caller's role and how it was established, or an
// HTTP status and why not. A bearer token is looked up by its SHA-256 in
// constant time; a verified client certificate names its role in its
// subject OU, exactly one.
func (h *Handler) caller(r *http.Request) (role, via string, code int, msg string) {
	if hdr := r.Header.Get("Authorization"); hdr != "" {
		tok, ok := strings.CutPrefix(hdr, "Bearer ")
		if !ok || strings.TrimSpace(tok) == "" {
			return "", "", http.StatusUnauthorized, "the Authorization header must be \"Bearer TOKEN\""
		}
		sum := sha256.Sum256([]byte(strings.TrimSpace(tok)))
		match := -1
		for i := range h.cfg.Tokens { // every entry compared, in constant time
			if subtle.ConstantTimeCompare(sum[:], h.cfg.Tokens[i].Hash[:]) == 1 {
				match = i
			}
		}
		if match < 0 {
			return "", "", http.StatusUnauthorized, "unknown bearer token"
		}
		return h.cfg.Tokens[match].Role, "token", 0, ""
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		leaf := r.TLS.VerifiedChains[0][0]
		var roles []string
		for _, ou := range leaf.Subject.OrganizationalUnit {
			if api.KnownRole(ou) {
				roles = append(roles, ou)
			}
		}
		if len(roles) != 1 {
			return "", "", http.StatusForbidden, fmt.Sprintf("client certificate %q must carry exactly one role in its subject OU (one of %s), it has %d", leaf.Subject.CommonName, strings.Join(api.Roles, ", "), len(roles))
		}
		return roles[0], "certificate " + leaf.Subject.CommonName, 0, ""
	}
	return "", "", http.StatusUnauthorized, "no credentials: send \"Authorization: Bearer TOKEN\" or a client certificate"
}

// handle serves pattern ("METHOD /path") to callers of the given roles.
func (h *Handler) handle(pattern string, roles []string, f http.HandlerFunc) {
	method, path, _ := strings.Cut(pattern, " ")
	h.methods[path] = append(h.methods[path], method)
	h.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		role, via, code, msg := h.caller(r)
		if code != 0 {
			if code == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="blindperso-issuer"`)
			}
			h.log.Info("refused", "method", r.Method, "path", r.URL.Path, "status", code, "why", msg, "remote", r.RemoteAddr)
			writeError(w, code, http.StatusText(code), msg)
			return
		}
		if !slices.Contains(roles, role) {
			h.log.Info("forbidden", "method", r.Method, "path", r.URL.Path, "role", role, "via", via)
			writeError(w, http.StatusForbidden, "Forbidden", fmt.Sprintf("role %q may not %s %s (needs %s)", role, r.Method, path, strings.Join(roles, " or ")))
			return
		}
		h.log.Info("request", "method", r.Method, "path", r.URL.Path, "role", role, "via", via)
		f(w, r)
	})
}
