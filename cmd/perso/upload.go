package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"blindperso/api"
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
		cl, err := api.NewClient(api.Config{URL: url, CAFile: ca, TokenFile: tokenFile, CertFile: cert, KeyFile: key, Timeout: timeout})
		if err != nil {
			return err
		}
		rep, err := cl.Upload(cmd.Context(), batchFile)
		if err != nil {
			return refusal(err)
		}
		out, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), string(out))
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

// refusal says, for an answer other than 200, what a station operator
// can do about it.
func refusal(err error) error {
	var e *api.Error
	if !errors.As(err, &e) {
		return err
	}
	hint := map[int]string{
		http.StatusUnauthorized:          "the issuer does not know this credential: check --token-file, or --cert and --key",
		http.StatusForbidden:             "the credential is not of the perso role",
		http.StatusRequestEntityTooLarge: "the batch is over the issuer's --max-batch: split it or raise the limit",
		http.StatusUnprocessableEntity:   "the batch does not match its manifest or is for another issuer key: nothing was imported",
	}[e.Status]
	if hint != "" {
		return fmt.Errorf("upload refused: %w (%s)", err, hint)
	}
	return fmt.Errorf("upload refused: %w", err)
}
