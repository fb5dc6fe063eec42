package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/batch"
)

func uploadCmd() *cobra.Command {
	var url, batchFile, ca, tokenFile, cert, key string
	var timeout time.Duration
	c := &cobra.Command{
		Use:   "upload --url https://ISSUER --batch FILE [--ca FILE] (--token-file FILE | --cert F --key F)",
		Short: "Send a sealed batch and its manifest to the issuer's API and print the import report",
		Long: `POST the batch (FILE) and its manifest (FILE.manifest.json, written by
perso seal) to the issuer's /v1/batches as multipart/form-data (parts
"manifest" then "batch"), streaming the file. The issuer imports it and
answers the report: records, imported, duplicates, conflicts, rejects, with
each reject's line and reason. The report is printed as JSON on stdout,
and each reject and conflict, with its line, on stderr; the command exits
non-zero if the upload was refused or any record was rejected or
conflicted. Uploading a batch again is safe: the issuer's import is
idempotent (records already stored are not imported twice), so after a
failure or a timeout simply run the same command again.

A refusal says what was wrong: 401 (the token or certificate is not
known to the issuer), 403 (it is not of the perso role), 413 (the batch
is larger than the issuer's --max-batch), 422 (the batch does not match
its manifest, or is for another issuer key), or a TLS error (the issuer's
certificate is not signed by the --ca given).

Authentication: a bearer token of the perso role (--token-file, the file
holds only the token) or a client certificate whose subject OU is "perso"
(--cert, --key). --ca names the CA that signed the issuer's TLS certificate
(default: the system's roots).`,
		Example: `  perso upload --url https://issuer.internal:8443 --batch batch.ndjson \
      --ca issuer-ca.pem --token-file /etc/blindperso/perso.token`,
		Args: cobra.NoArgs,
	}
	f := c.Flags()
	f.StringVar(&url, "url", "", "issuer API base URL (https://host:port)")
	f.StringVar(&batchFile, "batch", "", "the batch file (its .manifest.json beside it)")
	f.StringVar(&ca, "ca", "", "CA certificate(s) (PEM) to verify the issuer's TLS certificate")
	f.StringVar(&tokenFile, "token-file", "", "file holding a bearer token of the perso role")
	f.StringVar(&cert, "cert", "", "client certificate (PEM) for mTLS")
	f.StringVar(&key, "key", "", "client private key (PEM) for mTLS")
	f.DurationVar(&timeout, "timeout", 15*time.Minute, "the whole upload and import")
	c.MarkFlagRequired("url")
	c.MarkFlagRequired("batch")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		if !strings.HasPrefix(url, "https://") {
			return errors.New("--url must be https://: the issuer API is served only over TLS")
		}
		if (tokenFile == "") == (cert == "") || (cert == "") != (key == "") {
			return errors.New("give either --token-file or both --cert and --key")
		}
		tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if ca != "" {
			b, err := os.ReadFile(ca)
			if err != nil {
				return err
			}
			tlsCfg.RootCAs = x509.NewCertPool()
			if !tlsCfg.RootCAs.AppendCertsFromPEM(b) {
				return fmt.Errorf("%s: no PEM certificate in it", ca)
			}
		}
		var auth string
		if tokenFile != "" {
			b, err := os.ReadFile(tokenFile)
			if err != nil {
				return err
			}
			tok := strings.TrimSpace(string(b))
			if tok == "" {
				return fmt.Errorf("%s is empty", tokenFile)
			}
			auth = "Bearer " + tok
		} else {
			kp, err := tls.LoadX509KeyPair(cert, key)
			if err != nil {
				return err
			}
			tlsCfg.Certificates = []tls.Certificate{kp}
		}
		manifest, err := os.ReadFile(batch.ManifestPath(batchFile))
		if err != nil {
			return fmt.Errorf("%w (seal the batch first: perso seal)", err)
		}
		bf, err := os.Open(batchFile)
		if err != nil {
			return err
		}
		defer bf.Close()
		pr, pw := io.Pipe()
		mw := multipart.NewWriter(pw)
		go func() {
			err := func() error {
				w, err := mw.CreateFormFile("manifest", filepath.Base(batch.ManifestPath(batchFile)))
				if err != nil {
					return err
				}
				if _, err := w.Write(manifest); err != nil {
					return err
				}
				if w, err = mw.CreateFormFile("batch", filepath.Base(batchFile)); err != nil {
					return err
				}
				if _, err := io.Copy(w, bf); err != nil {
					return err
				}
				return mw.Close()
			}()
			pw.CloseWithError(err)
		}()
		req, err := http.NewRequestWithContext(cmd.Context(), "POST", strings.TrimRight(url, "/")+"/v1/batches", pr)
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", mw.FormDataContentType())
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		client := &http.Client{Timeout: timeout, Transport: &http.Transport{TLSClientConfig: tlsCfg}}
		resp, err := client.Do(req)
		if err != nil {
			return explainTLS(err, ca)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
		if err != nil {
			return err
		}
		var out bytes.Buffer
		if json.Indent(&out, body, "", "  ") != nil {
			out.Reset()
			out.Write(body)
		}
		if resp.StatusCode != http.StatusOK {
			return refusal(resp.Status, resp.StatusCode, body)
		}
		fmt.Fprintln(cmd.OutOrStdout(), strings.TrimSpace(out.String()))
		var rep struct {
			Rejects, Conflicts int
			RejectList         []struct {
				Line   int
				Reason string
			} `json:"reject_list"`
			ConflictList []struct {
				Line   int
				CardID string `json:"card_id"`
			} `json:"conflict_list"`
		}
		if err := json.Unmarshal(body, &rep); err != nil {
			return fmt.Errorf("report: %w", err)
		}
		for _, r := range rep.RejectList {
			fmt.Fprintf(cmd.ErrOrStderr(), "%s line %d: rejected: %s\n", batchFile, r.Line, r.Reason)
		}
		for _, k := range rep.ConflictList {
			fmt.Fprintf(cmd.ErrOrStderr(), "%s line %d: CONFLICT: card %s is stored at the issuer with another c\n", batchFile, k.Line, k.CardID)
		}
		if rep.Rejects > 0 || rep.Conflicts > 0 {
			return fmt.Errorf("the issuer rejected %d records and found %d conflicts (see the report)", rep.Rejects, rep.Conflicts)
		}
		return nil
	}
	return c
}

// refusal is the error for a non-200 answer: the issuer's JSON error and
// what to do about it.
func refusal(status string, code int, body []byte) error {
	var e struct{ Error, Detail string }
	msg := status
	switch {
	case json.Unmarshal(body, &e) == nil && e.Error != "":
		if e.Error != http.StatusText(code) {
			msg += ": " + e.Error
		}
		if e.Detail != "" {
			msg += ": " + e.Detail
		}
	case len(bytes.TrimSpace(body)) > 0: // not the issuer's JSON: a proxy?
		b := bytes.TrimSpace(body)
		if len(b) > 200 {
			b = append(b[:200:200], "…"...)
		}
		msg += fmt.Sprintf(" (not an issuer answer: %q)", b)
	}
	hint := map[int]string{
		http.StatusUnauthorized:          "the issuer does not know this credential: check --token-file, or --cert and --key",
		http.StatusForbidden:             "the credential is not of the perso role",
		http.StatusRequestEntityTooLarge: "the batch is over the issuer's --max-batch: split it or raise the limit",
		http.StatusUnprocessableEntity:   "the batch does not match its manifest or is for another issuer key: nothing was imported",
	}[code]
	if hint != "" {
		return fmt.Errorf("upload refused: %s (%s)", msg, hint)
	}
	return fmt.Errorf("upload refused: %s", msg)
}

// explainTLS says, for an error verifying the issuer's certificate, which
// roots it was checked against.
func explainTLS(err error, ca string) error {
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	var cv *tls.CertificateVerificationError
	if !errors.As(err, &ua) && !errors.As(err, &he) && !errors.As(err, &ci) && !errors.As(err, &cv) {
		return err
	}
	roots := "the system's roots (give --ca)"
	if ca != "" {
		roots = "--ca " + ca
	}
	return fmt.Errorf("TLS: the issuer's certificate is not trusted by %s: %w", roots, err)
}
