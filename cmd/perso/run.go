package main

import (
	"encoding/hex"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"blindperso/internal/stationcli"
	"blindperso/perso"
	"blindperso/protocol"
)

type runFlags struct {
	keyFile, profile, expect, batch string
	stationcli.Flags
}

func runCmd() *cobra.Command {
	var f runFlags
	c := &cobra.Command{
		Use:   "run",
		Short: "Personalize cards into a batch until --count are locked or a signal",
		Long: `Personalize every card presented in the selected readers under the issuer
public key in --issuer-key (PEM SubjectPublicKeyInfo) and --profile.

Each card's record (Id, c, profile, issuer-key fingerprint, reader, time;
for an attested card also its certificate chain and its signature over what
it made) is appended to the batch (--batch, NDJSON, format
blindperso-batch/2, docs/BATCH.md) and flushed to disk before the card is
locked, so a crash never strands a card: on restart a personalized card has
its c (and signature) read back and is locked. An attested card whose
attestation cannot be read is set aside unlocked. A batch begun by an older
station (blindperso-batch/1) is not resumed: finish it with that station or
start a new --batch file (perso seal writes the old batch's manifest). On exit the manifest
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
ecdh-p256-aes, rsa-oaep-kbkdf, ecdh-p256-kbkdf (docs/PROTOCOL.md).`,
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
	f.Register(fl)
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
	return f.Run(cmd, stationcli.Run{Job: job, Batch: f.batch, Fingerprint: job.Key.Fingerprint(), What: "station"})
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
