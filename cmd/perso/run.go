package main

import (
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/perso"
	"blindperso/protocol"
)

type runFlags struct {
	keyFile, profile, expect, batch, station string
	readers, readerNames                     []string
	regex, progress, logFile                 string
	count                                    int
	apduTimeout, cardTimeout                 time.Duration
}

func runCmd() *cobra.Command {
	var f runFlags
	c := &cobra.Command{
		Use:   "run",
		Short: "Personalize cards into a batch until --count are locked or a signal",
		Long: `Personalize every card presented in the selected readers under the issuer
public key in --issuer-key (PEM SubjectPublicKeyInfo) and --profile.

Each card's record (Id, c, profile, issuer-key fingerprint, reader, time) is
appended to the batch (--batch, NDJSON, docs/BATCH.md) and flushed to disk
before the card is locked, so a crash never strands a card: on restart a
personalized card has its c read back and is locked. On exit the manifest
(BATCH.manifest.json: count, SHA-256, profile, key fingerprint, station) is
written for the issuer. With --expect-fingerprint the station refuses to
start unless the key's SHA-256 fingerprint is the one given (get it from the
issuer out of band).

Readers: all by default; --readers takes indices (as "perso readers" lists
them) and exact names, --reader-regex a regular expression; without either,
the environment variables BLINDPERSO_READERS and BLINDPERSO_READER_REGEX are
used. Readers that appear later are picked up, cards pulled mid-way are
finished when they come back.

SIGINT or SIGTERM: every reader finishes the card in hand, then the station
exits cleanly. On a terminal a live display shows progress; otherwise log
lines go to standard error (or to --log).

Profiles: rsa-raw-sha1, rsa-oaep-sha1, rsa-oaep-aes, ecdh-p256-x963,
ecdh-p256-aes (docs/PROTOCOL.md).`,
		Example: `  perso run --issuer-key issuer.pub.pem --profile ecdh-p256-aes \
      --expect-fingerprint 5f1c… --batch batch-0001.ndjson --count 100
  perso run ... --readers 0,2 --reader-regex 'OMNIKEY'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return run(cmd, f) },
	}
	fl := c.Flags()
	fl.StringVar(&f.keyFile, "issuer-key", "", "issuer public key, PEM SubjectPublicKeyInfo (required)")
	fl.StringVar(&f.profile, "profile", "", "profile (required), e.g. ecdh-p256-aes")
	fl.StringVar(&f.batch, "batch", "", "batch file to append records to, NDJSON (required)")
	fl.StringVar(&f.expect, "expect-fingerprint", "", "SHA-256 fingerprint the issuer key must have (64 hex digits)")
	fl.StringSliceVar(&f.readers, "readers", nil, "readers by index or exact name, comma-separated (default: all)")
	fl.StringArrayVar(&f.readerNames, "reader", nil, "one reader by index or exact name (repeatable; names may hold commas)")
	fl.StringVar(&f.regex, "reader-regex", "", "readers whose name matches this regular expression")
	fl.IntVar(&f.count, "count", 0, "stop after this many cards are locked (0: until interrupted)")
	fl.StringVar(&f.station, "station", "", "station name for the manifest (default: host name)")
	fl.StringVar(&f.progress, "progress", "auto", "live display: auto (on a terminal), on, off")
	fl.StringVar(&f.logFile, "log", "", "append log lines to this file (default: standard error, unless the display is on)")
	fl.DurationVar(&f.apduTimeout, "apdu-timeout", 5*time.Second, "longest wait for one card answer")
	fl.DurationVar(&f.cardTimeout, "card-timeout", 30*time.Second, "longest time for one card")
	c.MarkFlagRequired("issuer-key")
	c.MarkFlagRequired("profile")
	c.MarkFlagRequired("batch")
	return c
}

func run(cmd *cobra.Command, f runFlags) error {
	// Everything that can be wrong with the inputs is checked before the
	// batch is created: a refused start leaves no file behind.
	job, err := loadJob(f.keyFile, f.profile, f.expect)
	if err != nil {
		return err
	}
	sel, err := selector(f)
	if err != nil {
		return err
	}
	if f.count < 0 {
		return fmt.Errorf("--count must be 0 or more, got %d", f.count)
	}
	station := f.station
	if station == "" {
		if station, err = os.Hostname(); err != nil {
			return fmt.Errorf("station name: %w (give --station)", err)
		}
	}
	show := false
	switch f.progress {
	case "auto":
		show = perso.IsTerminal(os.Stderr)
	case "on":
		show = true
	case "off":
	default:
		return fmt.Errorf("--progress must be auto, on or off, got %q", f.progress)
	}
	var logw io.Writer = cmd.ErrOrStderr()
	if show {
		logw = io.Discard
	}
	if f.logFile != "" {
		lf, err := os.OpenFile(f.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("open log: %w", err)
		}
		defer lf.Close()
		logw = lf
	}
	log := slog.New(slog.NewTextHandler(logw, nil))

	fp := job.Key.Fingerprint()
	j, err := perso.OpenJournal(f.batch, job.Profile.Name, fp[:], log)
	if err != nil {
		return err
	}
	defer j.Close()
	if _, err := perso.WriteManifest(j, station); err != nil {
		return err
	}
	log.Info("station started", "station", station, "profile", job.Profile.Name,
		"issuer_fingerprint", hex.EncodeToString(fp[:]), "batch", f.batch,
		"records", j.Len(), "readers", sel.String(), "count", f.count)

	stats := perso.NewStats()
	st := &perso.Station{Job: job, Ledger: j, Log: log, Count: f.count, Stats: stats,
		APDUTimeout: f.apduTimeout, CardTimeout: f.cardTimeout}
	var prog *perso.Progress
	if show {
		prog = perso.StartProgress(os.Stderr, stats, f.count)
	}
	runErr := st.Run(cmd.Context(), perso.PCSC{Select: sel, Log: log})
	if prog != nil {
		prog.Stop()
	}
	m, merr := perso.WriteManifest(j, station)
	if runErr != nil {
		log.Error("station stopped on error", "err", runErr)
		return runErr
	}
	if merr != nil {
		return merr
	}
	log.Info("station stopped", "cards_locked", st.Done(), "batch_records", m.Count,
		"batch_sha256", hex.EncodeToString(m.SHA256), "manifest", perso.ManifestPath(f.batch))
	if show {
		fmt.Fprintf(cmd.ErrOrStderr(), "%d cards locked; batch %s: %d records, manifest %s\n",
			st.Done(), f.batch, m.Count, perso.ManifestPath(f.batch))
	}
	return nil
}

func selector(f runFlags) (perso.Selector, error) {
	items := append(append([]string(nil), f.readers...), f.readerNames...)
	regex := f.regex
	if len(items) == 0 && regex == "" {
		if v := os.Getenv(perso.EnvReaders); v != "" {
			items = strings.Split(v, ",")
		}
		regex = os.Getenv(perso.EnvReaderRegex)
	}
	return perso.ParseSelector(items, regex)
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
		return perso.Job{}, fmt.Errorf("issuer key %s: %w", keyFile, err)
	}
	var want []byte
	if expect != "" {
		if want, err = hex.DecodeString(expect); err != nil || len(want) != 32 {
			return perso.Job{}, fmt.Errorf("--expect-fingerprint must be 64 hex digits, got %q", expect)
		}
	}
	return perso.NewJob(p, key, want)
}
