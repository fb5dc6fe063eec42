package main

import (
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"blindperso/internal/insider"
	"blindperso/protocol"
)

type cloneFlags struct {
	batch, issuerKey, id, cardOut string
	inject, keepAttestation       bool
}

func cloneCmd() *cobra.Command {
	var f cloneFlags
	c := &cobra.Command{
		Use:   "clone --batch FILE --issuer-key ISSUER.pub.pem --id HEX --card-out CLONE.json [--inject] [--keep-attestation]",
		Short: "Replace a card's record in a sealed batch by one for an emulated clone (or inject a new Id)",
		Long: `ATTACK TOOL, for demos and tests only. Never run it on a perso line.

Record replacement and injection with an emulated clone (PROTOCOL.md §10,
"What it closes"). The insider at the station leaves the issuer key alone:

  1. she makes a virtual card of her own (the state file --card-out, which
     must not exist) with the Id --id, personalizes it under the GENUINE
     issuer key --issuer-key with randomness she draws, so that it answers
     c* = E_PK(r*) and keeps K* = KDF(r*, B(PK)), and locks it;
  2. in the sealed batch --batch she replaces the card's record (Id, c) by
     (Id, c*) — same reader, time, profile and key fingerprint — or, with
     --inject, appends a record for an Id that no genuine card carries;
  3. she reseals the manifest: count, bytes and sha256 recomputed, every
     other member as the station wrote it, so the batch matches its
     manifest again. Both files are replaced atomically.

The issuer imports the record and its token derives K* from c*, the key
the clone holds: the clone authenticates, and the genuine card, whose c
the issuer never saw, fails. The paper's binding B does not help: it
protects the genuine card's key (Theorem 3), not the issuer's acceptance
of a c. What closes the attack is chip attestation (§10): a genuine chip
signs SHA-256 of the c it made, under a key certified at manufacture,
and the issuer checks it at import. An issuer that does not is fooled.

Attestation (version-2 batches). By default the forged record carries no
"attestation" member: an unattested record, refused by an issuer whose
policy is "required". --keep-attestation copies the genuine record's
attestation unchanged: the insider cannot sign for c* with the chip's key,
so it names SHA-256 of the genuine c, not of c* (§10.4 check 5). A
version-1 batch is rewritten whole as version 2 (the same records).

THE CLONE'S STATE FILE HOLDS K*, in the clear, as every virtual card's
does: it is the attack's loot and whoever has it authenticates as that
card. It is written mode 0600; keep it out of logs and shared places.
Present it with "vcard feed CLONE.json" or check it with "vcard
authenticate --issuer URL ... CLONE.json". insider prints and logs
neither r* nor K* (nor c*); the rest of what it prints is public.`,
		Example: `  insider clone --batch batch.ndjson --issuer-key issuer.pub.pem --id b102 --card-out clone.json
  insider clone --batch batch.ndjson --issuer-key issuer.pub.pem --id ee01 --card-out ghost.json --inject`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return clone(cmd, f) },
	}
	fl := c.Flags()
	fl.StringVar(&f.batch, "batch", "", "the sealed batch to forge, NDJSON, with its FILE.manifest.json beside it (required)")
	fl.StringVar(&f.issuerKey, "issuer-key", "", "the genuine issuer public key, PEM SubjectPublicKeyInfo; the batch must be for it (required)")
	fl.StringVar(&f.id, "id", "", "the card Id to clone, hex (required)")
	fl.StringVar(&f.cardOut, "card-out", "", "state file for the clone (required; must not exist; it will hold K*)")
	fl.BoolVar(&f.inject, "inject", false, "add a record for an Id that is not in the batch, instead of replacing one")
	fl.BoolVar(&f.keepAttestation, "keep-attestation", false, "copy the genuine record's attestation into the forged record (default: drop it)")
	for _, n := range []string{"batch", "issuer-key", "id", "card-out"} {
		c.MarkFlagRequired(n)
	}
	return c
}

func clone(cmd *cobra.Command, f cloneFlags) error {
	id, err := hex.DecodeString(strings.TrimSpace(f.id))
	if err != nil {
		return fmt.Errorf("--id %q is not hex: %w", f.id, err)
	}
	if len(id) == 0 || len(id) > protocol.MaxIDLen {
		return fmt.Errorf("--id of %d bytes, want 1 to %d", len(id), protocol.MaxIDLen)
	}
	pemBytes, err := os.ReadFile(f.issuerKey)
	if err != nil {
		return fmt.Errorf("read issuer key: %w", err)
	}
	genuine, err := protocol.ParseIssuerKeyPEM(pemBytes)
	if err != nil {
		return fmt.Errorf("issuer key %s: %w", f.issuerKey, err)
	}
	log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
	res, err := insider.Clone(f.batch, genuine, id, f.cardOut, insider.CloneOptions{
		Inject: f.inject, KeepAttestation: f.keepAttestation, Log: log})
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	hid := hex.EncodeToString(id)
	fp := genuine.Fingerprint()
	fmt.Fprintln(out, "ATTACK TOOL: record replacement with an emulated clone (PROTOCOL.md §10); demos and tests only")
	what := "replaced"
	if f.inject {
		what = "injected"
	}
	fmt.Fprintf(out, "card %s: record %s at line %d of %s: c* = E_PK(r*) under issuer key sha256 %x\n",
		hid, what, res.Line, filepath.Base(f.batch), fp)
	switch res.Attestation {
	case insider.AttestationKept:
		fmt.Fprintln(out, "attestation: kept, unchanged (it signs SHA-256 of the genuine c, not of c*)")
	case insider.AttestationDropped:
		fmt.Fprintln(out, "attestation: dropped (the forged record is unattested)")
	default:
		fmt.Fprintln(out, "attestation: none (the record had none to keep or drop)")
	}
	if res.Upgraded {
		fmt.Fprintf(out, "batch rewritten from version 1 as %s\n", res.Manifest.Format)
	}
	fmt.Fprintf(out, "manifest resealed: count %d, bytes %d, sha256 %x\n", res.Manifest.Count, res.Manifest.Bytes, []byte(res.Manifest.SHA256))
	fmt.Fprintf(out, "clone: %s, a locked card with Id %s holding K* (the key the issuer will derive from c*): keep it secret\n", f.cardOut, hid)
	return nil
}
