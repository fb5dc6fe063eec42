package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/issuer"
	"blindperso/issuer/server"
)

func serveCmd() *cobra.Command {
	var addr, certFile, keyFile, clientCA, tokensFile, uploadDir string
	var workers, maxFailures int
	var maxBatch int64
	var ttl, retention, timeout time.Duration
	c := &cobra.Command{
		Use:   "serve --tls-cert F --tls-key F [--client-ca F] [--tokens F] --token URI --key L --kek L [--db DIR|DSN]",
		Short: "Serve the issuer's HTTP API over TLS: batch upload, card authentication, card management",
		Long: `Serve the API described in docs/openapi.yaml, always over TLS.

Clients authenticate with a bearer token (--tokens: lines "ROLE SHA256HEX";
make the hash with "issuer serve token-hash") or, with --client-ca, with a
client certificate signed by that CA whose subject OU is the role. Roles:

  perso     POST /v1/batches, GET /v1/batches/{id}
  verifier  POST /v1/cards/{id}/challenge, POST /v1/cards/{id}/verify
  admin     GET /v1/cards, GET /v1/cards/{id}, POST /v1/cards/{id}/block|unblock,
            GET /v1/batches, GET /v1/batches/{id}, GET /metrics
  metrics   GET /metrics (a Prometheus scraper)

admin does not upload batches nor verify cards (separation of duties).
/healthz needs no credentials. A missing or unknown credential is 401, a
known one of another role 403; every error is JSON {"error", "detail"}.

Challenges are single-use and expire after --challenge-ttl; expired ones,
used or not, are purged --challenge-retention after their expiry (all of
them at start, a few more with every challenge issued), so a late answer
is still told "expired" within the retention.

The server logs to stderr, starting with a line "serving" that has the
address it listens on (--addr 127.0.0.1:0 picks a free port). SIGINT or
SIGTERM stops it gracefully. See docs/ISSUER.md "HTTP API".

` + attestHelp + ` Uploads are checked as issuer import
checks them.

` + uriHelp + "\n\n" + memberHelp,
		Example: `  issuer serve --addr :8443 --tls-cert server.pem --tls-key server.key \
      --tokens /etc/blindperso/tokens --client-ca clients-ca.pem \
      --key issuer-2026 --kek kek-1 --db /var/lib/blindperso-issuer
  head -c 32 /dev/urandom | base64 > perso.token
  echo "perso $(issuer serve token-hash < perso.token)" >> /etc/blindperso/tokens`,
		Args: cobra.NoArgs,
	}
	openIssuer := issuerFlags(c, true)
	openStore := dbFlag(c)
	checker := attestFlags(c)
	f := c.Flags()
	f.StringVar(&addr, "addr", ":8443", "address to listen on")
	f.StringVar(&certFile, "tls-cert", "", "server certificate (PEM; required)")
	f.StringVar(&keyFile, "tls-key", "", "server private key (PEM; required)")
	f.StringVar(&clientCA, "client-ca", "", "CA certificates (PEM) for client certificates: enables mTLS, role = subject OU")
	f.StringVar(&tokensFile, "tokens", "", `bearer tokens file: lines "ROLE SHA256HEX"`)
	f.StringVar(&uploadDir, "upload-dir", "", "where uploaded batches are spooled during their import (default DB/uploads for a SQLite store, else a directory under $TMPDIR)")
	f.IntVar(&workers, "workers", 2, "token sessions per import")
	f.Int64Var(&maxBatch, "max-batch", server.DefaultMaxBatchBytes, "largest batch an upload may carry, in bytes")
	f.IntVar(&maxFailures, "max-failures", issuer.DefaultMaxFailures, "failed verifications in a row that block a card")
	f.DurationVar(&ttl, "challenge-ttl", issuer.DefaultChallengeTTL, "how long a challenge can be answered")
	f.DurationVar(&retention, "challenge-retention", issuer.DefaultChallengeRetention, "how long an expired challenge is kept (so a late answer is told \"expired\") before it is purged")
	f.DurationVar(&timeout, "timeout", 15*time.Minute, "read and write timeout of a request (an upload's import runs within it)")
	c.MarkFlagRequired("tls-cert")
	c.MarkFlagRequired("tls-key")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		if tokensFile == "" && clientCA == "" {
			return errors.New("no way for clients to authenticate: give --tokens FILE and/or --client-ca FILE")
		}
		switch {
		case workers < 1:
			return fmt.Errorf("--workers %d: must be at least 1", workers)
		case maxBatch < 1:
			return fmt.Errorf("--max-batch %d: must be positive", maxBatch)
		case maxFailures < 1:
			return fmt.Errorf("--max-failures %d: must be at least 1", maxFailures)
		case ttl <= 0 || retention <= 0 || timeout <= 0:
			return errors.New("--challenge-ttl, --challenge-retention and --timeout must be positive")
		}
		tlsCfg, err := server.TLSConfig(certFile, keyFile, clientCA)
		if err != nil {
			return err
		}
		var tokens []server.TokenEntry
		if tokensFile != "" {
			if tokens, err = server.LoadTokens(tokensFile); err != nil {
				return err
			}
		}
		ctx := cmd.Context() // cancelled by SIGINT and SIGTERM (main)
		atLeastProcs(workers)
		is, err := openIssuer(ctx, workers+2)
		if err != nil {
			return err
		}
		defer closeIssuer(is)
		ck, err := checker(is)
		if err != nil {
			return err
		}
		st, err := openStore(ctx) // after the token: a failing token leaves no new store
		if err != nil {
			return err
		}
		defer st.Close()
		if uploadDir == "" {
			uploadDir = defaultUploadDir(cmd.Flags().Lookup("db").Value.String())
		}
		log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
		h, err := server.New(server.Config{Issuer: is, Store: st, UploadDir: uploadDir, Workers: workers,
			MaxBatchBytes: maxBatch, Tokens: tokens, Attest: ck, ChallengeTTL: ttl, ChallengeRetention: retention,
			MaxFailures: maxFailures, Logger: log})
		if err != nil {
			return err
		}
		if n, err := h.PurgeChallenges(ctx); err != nil {
			log.Warn("purging expired challenges failed; serving anyway (issuing challenges purges too)", "err", err)
		} else {
			log.Info("purged expired challenges", "count", n, "retention", retention)
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		srv := server.NewHTTP(addr, h, tlsCfg, timeout)
		srv.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelWarn)
		errc := make(chan error, 1)
		go func() { errc <- srv.ServeTLS(ln, "", "") }()
		if ck != nil {
			for _, r := range ck.Roots.List() {
				log.Info("trusted chip-vendor root", "subject", r.Subject, "sha256", fmt.Sprintf("%x", r.Fingerprint), "policy", ck.Policy)
			}
		}
		log.Info("serving", "addr", ln.Addr().String(), "tokens", len(tokens), "mtls", clientCA != "", "upload_dir", uploadDir)
		select {
		case err := <-errc:
			return err
		case <-ctx.Done():
		}
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
	c.AddCommand(tokenHashCmd())
	return c
}

func defaultUploadDir(db string) string {
	if db == "" {
		db = os.Getenv(envDB)
	}
	if db == "" {
		db = "issuer-data"
	}
	if strings.HasPrefix(db, "postgres://") || strings.HasPrefix(db, "postgresql://") || strings.Contains(db, "=") {
		return filepath.Join(os.TempDir(), "blindperso-issuer-uploads")
	}
	return filepath.Join(db, "uploads")
}

func tokenHashCmd() *cobra.Command {
	var role string
	c := &cobra.Command{
		Use:   "token-hash [--role ROLE] < TOKEN",
		Short: "Print the SHA-256 of a bearer token read from stdin, for the --tokens file",
		Long: `Read one token from stdin (its first line; surrounding white space is not
part of it) and print its hex SHA-256, or with --role a whole tokens-file
line "ROLE SHA256HEX". The server stores only this hash; the token itself
stays with the client (perso upload --token-file).`,
		Example: `  issuer serve token-hash --role verifier < verifier.token >> tokens`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			line, err := bufio.NewReader(io.LimitReader(cmd.InOrStdin(), 4096)).ReadString('\n')
			if err != nil && err != io.EOF {
				return err
			}
			if strings.TrimSpace(line) == "" {
				return errors.New("no token on stdin")
			}
			h := server.HashToken(line)
			if role != "" {
				if _, err := server.ParseTokens(strings.NewReader(role + " " + h)); err != nil {
					return fmt.Errorf("--role: %w", err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s %s\n", role, h)
				return nil
			}
			fmt.Fprintln(cmd.OutOrStdout(), h)
			return nil
		},
	}
	c.Flags().StringVar(&role, "role", "", "print a tokens-file line for this role (perso, verifier, admin, metrics)")
	return c
}
