// Command insider is an ATTACK TOOL for demos and tests only: two attacks
// of an insider at the perso station (package internal/insider). Never
// install it on a perso line.
//
// insider run is the active insider of the paper's Fig. 2 (PK
// substitution). It is the perso station (package perso, unchanged) run
// with the attacker's own public key PK′ and a ledger that forges each
// record for the genuine issuer key. Cards personalized by it hold K_I′ =
// KDF(S, B(PK′)); the issuer imports its batch, derives KDF(S, B(PK)), and
// blocks the cards when they fail to authenticate. scripts/demo.sh and
// the e2e test run it to show exactly that.
//
// insider clone is record replacement and injection (docs/PROTOCOL.md
// §10): a sealed batch's record (Id, c) is replaced by (Id, c*) with c* =
// E_PK(r*) from an emulated clone personalized under the genuine PK, or a
// record is added for an Id no card carries. Against an issuer that does
// not check chip attestation the clone authenticates and the genuine card
// fails.
package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"blindperso/internal/insider"
	"blindperso/internal/stationcli"
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
		Use:   "insider",
		Short: "ATTACK TOOL (demos and tests only): an insider at the perso station (Fig. 2 key substitution; record replacement with a clone)",
		Long: `insider is an attack tool for demonstrations and tests of blindperso. Do
not install it on a perso line.

insider run plays the paper's active insider (Handschuh, Naccache,
Paillier, Tymen 2002, §4.3, Fig. 2): a perso station that sends the cards
its own public key PK′ instead of the issuer's PK. It opens each card's c′
with its private key, re-encrypts the secret S under the genuine PK
(rsa-raw, rsa-oaep; for ecdh it forwards c′, which it cannot re-encrypt)
and writes the record with PK's fingerprint, so the batch and its manifest
look like an honest station's and the issuer imports them.
That attack fails: the card bound PK′ into its key, K_I′ = KDF(S, B(PK′)),
while the issuer's token derives KDF(S, B(PK)). The card never
authenticates, and the issuer blocks it after --max-failures tries.

insider clone is the attack that the binding does not stop (PROTOCOL.md
§10): it replaces a card's record in a sealed batch by one for an emulated
clone personalized under the genuine PK, or injects a record for an Id no
card carries. Against an issuer that does not check chip attestation it
works: the clone authenticates, the genuine card fails. See insider clone
--help.

insider never prints or logs S, r* or any card key; insider clone writes
its clone's state file, which holds the clone's key: that file is the
attack's loot.`,
		SilenceUsage: true,
	}
	c.AddCommand(runCmd(), cloneCmd(), keygenCmd())
	return c
}

type runFlags struct {
	attackerKey, issuerKey, profile, batch string
	stationcli.Flags
}

func runCmd() *cobra.Command {
	var f runFlags
	c := &cobra.Command{
		Use:   "run --attacker-key KEY.pem --issuer-key ISSUER.pub.pem --profile P --batch FILE",
		Short: "Personalize cards under the attacker's key; write a batch forged for the issuer's key",
		Long: `ATTACK TOOL, for demos and tests only.

Run the perso station (the same code as "perso run": readers, crash-safe
journal, manifest, progress display) with the attacker's public key (from
the PKCS#8 private key in --attacker-key) sent to every card. Each record
is rewritten before it is journaled: c′ is opened with the attacker's key
and S re-encrypted under --issuer-key (rsa-raw-sha1: raw RSA; rsa-oaep-*:
RSA-OAEP with SHA-1), or forwarded as is (ecdh-*: the insider cannot
re-encrypt a Diffie-Hellman secret); the record and the manifest name the
issuer key's fingerprint. Upload the batch with "perso upload": the issuer
imports it, and every card it holds fails authentication.

Readers, --count, --progress, --log and the timeouts work as in perso run.`,
		Example: `  insider keygen --out attacker.pem --kind rsa2048 --issuer-key issuer.pub.pem
  insider run --attacker-key attacker.pem --issuer-key issuer.pub.pem \
      --profile rsa-oaep-aes --batch insider.ndjson --count 3 \
      --reader 'Virtual PCD 00 00' --reader 'Virtual PCD 00 01'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return run(cmd, f) },
	}
	fl := c.Flags()
	fl.StringVar(&f.attackerKey, "attacker-key", "", "the attacker's private key, PEM PKCS#8 (required; insider keygen makes one)")
	fl.StringVar(&f.issuerKey, "issuer-key", "", "the genuine issuer public key, PEM SubjectPublicKeyInfo (required)")
	fl.StringVar(&f.profile, "profile", "", "profile (required), e.g. rsa-oaep-aes")
	fl.StringVar(&f.batch, "batch", "", "batch file to append forged records to, NDJSON (required)")
	f.Register(fl)
	c.MarkFlagRequired("attacker-key")
	c.MarkFlagRequired("issuer-key")
	c.MarkFlagRequired("profile")
	c.MarkFlagRequired("batch")
	return c
}

func run(cmd *cobra.Command, f runFlags) error {
	// Every input is checked before the batch is created.
	p, err := protocol.ProfileByName(f.profile)
	if err != nil {
		return err
	}
	attacker, err := insider.LoadKey(f.attackerKey)
	if err != nil {
		return err
	}
	pemBytes, err := os.ReadFile(f.issuerKey)
	if err != nil {
		return fmt.Errorf("read issuer key: %w", err)
	}
	genuine, err := protocol.ParseIssuerKeyPEM(pemBytes)
	if err != nil {
		return fmt.Errorf("issuer key %s: %w", f.issuerKey, err)
	}
	job, err := insider.Job(p, attacker)
	if err != nil {
		return fmt.Errorf("attacker key: %w", err)
	}
	if _, err := insider.NewLedger(nil, p, attacker, genuine, nil); err != nil {
		return err
	}
	// The journal is opened for the genuine key: its records and its
	// manifest name PK's fingerprint, as an honest station's would.
	afp := attacker.Public.Fingerprint()
	return f.Run(cmd, stationcli.Run{
		Job: job, Batch: f.batch, Fingerprint: genuine.Fingerprint(),
		Ledger: func(j *perso.Journal, log *slog.Logger) (perso.Ledger, error) {
			log.Warn("ATTACK TOOL: insider station (paper Fig. 2); cards get the attacker's key",
				"attacker_fingerprint", hex.EncodeToString(afp[:]))
			return insider.NewLedger(j, p, attacker, genuine, log)
		},
		What: "insider station",
	})
}

func keygenCmd() *cobra.Command {
	var out, pubOut, kind, issuerKey string
	c := &cobra.Command{
		Use:   "keygen --out FILE [--kind rsa2048|p256] [--issuer-key ISSUER.pub.pem] [--pub-out FILE]",
		Short: "Make the attacker's key pair (PEM PKCS#8, mode 0600); print its fingerprint",
		Long: `ATTACK TOOL, for demos and tests only.

Write a fresh attacker key pair to --out (PEM PKCS#8 private key, created
exclusively, mode 0600) and, with --pub-out, its public key (PEM
SubjectPublicKeyInfo). With --issuer-key and --kind rsa2048, the key is
drawn until its modulus is below the issuer's, so that under rsa-raw-sha1
every r a card draws can be carried to the issuer.`,
		Example: `  insider keygen --out attacker.pem --kind rsa2048 --issuer-key issuer.pub.pem --pub-out attacker.pub.pem`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var below *protocol.IssuerKey
			if issuerKey != "" {
				b, err := os.ReadFile(issuerKey)
				if err != nil {
					return fmt.Errorf("read issuer key: %w", err)
				}
				if below, err = protocol.ParseIssuerKeyPEM(b); err != nil {
					return fmt.Errorf("issuer key %s: %w", issuerKey, err)
				}
			}
			k, err := insider.GenerateKey(kind, below)
			if err != nil {
				return err
			}
			if err := writeNew(out, k.PEM(), 0o600); err != nil {
				return err
			}
			if pubOut != "" {
				if err := writeNew(pubOut, k.Public.PEM(), 0o644); err != nil {
					return err
				}
			}
			fp := k.Public.Fingerprint()
			fmt.Fprintf(cmd.OutOrStdout(), "attacker key %s (%s) sha256 %x\n", out, kind, fp)
			return nil
		},
	}
	c.Flags().StringVar(&out, "out", "", "file for the private key (required; must not exist)")
	c.Flags().StringVar(&pubOut, "pub-out", "", "file for the public key (must not exist)")
	c.Flags().StringVar(&kind, "kind", insider.KindRSA2048, "rsa2048 or p256")
	c.Flags().StringVar(&issuerKey, "issuer-key", "", "issuer public key (PEM): an RSA key is drawn with a modulus below its")
	c.MarkFlagRequired("out")
	return c
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s exists: not overwriting it", path)
		}
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
