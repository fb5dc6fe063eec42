// Command perso is the personalization station: it sends the issuer's
// public key to every card in the PC/SC readers and collects (Id, c).
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/ebfe/scard"
	"github.com/spf13/cobra"

	"blindperso/perso"
	"blindperso/protocol"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root().ExecuteContext(ctx); err != nil {
		os.Exit(1)
	}
}

func root() *cobra.Command {
	c := &cobra.Command{
		Use:   "perso",
		Short: "blindperso personalization station",
		Long: `perso drives PC/SC card readers: it sends the issuer's public key to each
card, collects the card's (Id, c), records it, and only then locks the card.
It holds no secret: the issuer key is public, c can be opened only by the
issuer's token, and the card keeps K_I.`,
		SilenceUsage: true,
	}
	c.AddCommand(runCmd())
	return c
}

func runCmd() *cobra.Command {
	var keyFile, profileName, expect, out string
	var readers []string
	var count int
	c := &cobra.Command{
		Use:   "run",
		Short: "Personalize cards until --count are locked",
		Long: `Personalize every card presented in the readers (all PC/SC readers, or
those named with --reader) under the issuer public key in --issuer-key
(PEM SubjectPublicKeyInfo) and --profile. Each card's record (Id, c,
profile, issuer-key fingerprint, reader, time) is written as one JSON line
to --out and flushed to disk before the card is locked. With
--expect-fingerprint the station refuses to start unless the key's SHA-256
fingerprint is the one given (get it from the issuer out of band).

Profiles: rsa-raw-sha1, rsa-oaep-sha1, rsa-oaep-aes, ecdh-p256-x963,
ecdh-p256-aes (docs/PROTOCOL.md).`,
		Example: `  perso run --issuer-key issuer.pub.pem --profile ecdh-p256-aes \
      --expect-fingerprint 5f1c… --count 100 --out batch.ndjson`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			job, err := loadJob(keyFile, profileName, expect)
			if err != nil {
				return err
			}
			if len(readers) == 0 {
				if readers, err = listReaders(); err != nil {
					return err
				}
			}
			store, closeStore, err := ndjsonStore(out, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			defer closeStore()
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			return runReaders(cmd.Context(), job, readers, count, store, log)
		},
	}
	c.Flags().StringVar(&keyFile, "issuer-key", "", "issuer public key, PEM SubjectPublicKeyInfo (required)")
	c.Flags().StringVar(&profileName, "profile", "", "profile (required), e.g. ecdh-p256-aes")
	c.Flags().StringVar(&expect, "expect-fingerprint", "", "SHA-256 fingerprint the issuer key must have (hex)")
	c.Flags().StringArrayVar(&readers, "reader", nil, "PC/SC reader name (repeatable; default: every reader)")
	c.Flags().IntVar(&count, "count", 0, "stop after this many cards are locked (0: until interrupted)")
	c.Flags().StringVar(&out, "out", "-", "file to append records to as NDJSON (-: standard output)")
	c.MarkFlagRequired("issuer-key")
	c.MarkFlagRequired("profile")
	return c
}

func loadJob(keyFile, profileName, expect string) (perso.Job, error) {
	p, err := protocol.ProfileByName(profileName)
	if err != nil {
		return perso.Job{}, err
	}
	pemBytes, err := os.ReadFile(keyFile)
	if err != nil {
		return perso.Job{}, fmt.Errorf("read issuer key: %w", err)
	}
	key, err := protocol.ParseIssuerKeyPEM(pemBytes)
	if err != nil {
		return perso.Job{}, fmt.Errorf("%s: %w", keyFile, err)
	}
	var want []byte
	if expect != "" {
		if want, err = hex.DecodeString(expect); err != nil || len(want) != 32 {
			return perso.Job{}, fmt.Errorf("--expect-fingerprint must be 64 hex digits, got %q", expect)
		}
	}
	return perso.NewJob(p, key, want)
}

func listReaders() ([]string, error) {
	sc, err := scard.EstablishContext()
	if err != nil {
		return nil, fmt.Errorf("PC/SC: establish context (is pcscd running?): %w", err)
	}
	defer sc.Release()
	rs, err := sc.ListReaders()
	if err != nil || len(rs) == 0 {
		return nil, fmt.Errorf("PC/SC: no readers found (%v)", err)
	}
	return rs, nil
}

// ndjsonStore appends each record as a JSON line and syncs the file before
// returning, so a record that was stored survives a crash.
func ndjsonStore(path string, stdout io.Writer) (perso.Store, func() error, error) {
	var mu sync.Mutex
	if path == "-" {
		enc := json.NewEncoder(stdout)
		return func(r perso.Record) error {
			mu.Lock()
			defer mu.Unlock()
			return enc.Encode(r)
		}, func() error { return nil }, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	enc := json.NewEncoder(f)
	return func(r perso.Record) error {
		mu.Lock()
		defer mu.Unlock()
		if err := enc.Encode(r); err != nil {
			return err
		}
		return f.Sync()
	}, f.Close, nil
}

func runReaders(ctx context.Context, job perso.Job, readers []string, count int, store perso.Store, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	done := 0
	var wg sync.WaitGroup
	errs := make(chan error, len(readers))
	for _, name := range readers {
		r := &perso.Reader{Name: name, Job: job, Store: store, Log: log, OnRecord: func(perso.Record) {
			mu.Lock()
			defer mu.Unlock()
			if done++; count > 0 && done >= count {
				cancel()
			}
		}}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r.Run(ctx, 0); err != nil {
				errs <- err
				cancel()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	log.Info("station stopped", "cards_locked", done)
	return nil
}
