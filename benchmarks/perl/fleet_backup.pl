#!/usr/bin/perl
# Driver of the Perl side of benchmarks/bench_backup.py: the original VM::EC2::Staging
# (Debian's libvm-ec2-perl) backing a fleet up its way, one server after another.
#
# Reads one JSON request per line on stdin, answers one JSON line on stdout:
#   {"op": "fleet", "names": ["a", "b"]}          -> get_server(-name => ...) each, in turn
#   {"op": "backup", "servers": ["a", "b"], "prefix": "bk4", "source": "/srv/app", "size": 1}
#       -> for each server in turn: provision a volume on it, rsync the source into it,
#          snapshot it, delete the volume; then wait until every snapshot is completed
# and BenchDriver.pm's "ssh", "terminate" and "quit". The answer of "fleet" and "backup"
# carries "seconds", the wall time of the timed part. Arguments, environment, answers:
# BenchDriver.pm.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use Time::HiRes qw(time);
use BenchDriver qw(start serve server_named);

my ($ec2, $manager) = start(@ARGV);

# One server's backup, the module's way: a volume on the server, the source rsynced into
# it, a snapshot (the module unmounts the volume for it and mounts it again), the volume
# deleted. The rsync is the same-server branch of Manager::rsync
# (`$server->ssh('sudo', 'rsync', ...)` with the module's own options): its path resolver
# knows only eight-digit instance ids, so "$instance:/path" cannot name the source.
sub backup_one {
    my ($server, $name, $source, $size) = @_;
    my $vol = $server->provision_volume(-name => $name, -size => $size);
    $server->ssh('sudo', 'rsync', $manager->_rsync_args, "$source/", $vol->mtpt . '/')
        or die "rsync into $vol failed\n";
    my $snap = $vol->create_snapshot("backup $name") or die "no snapshot of $vol\n";
    $vol->delete;
    return $snap;
}

serve({
    fleet => sub {
        my $r = shift;
        my $t = time;
        server_named($_) for @{ $r->{names} };
        return { seconds => time - $t };
    },
    backup => sub {
        my $r       = shift;
        my @servers = map { server_named($_) } @{ $r->{servers} };
        my $t       = time;
        my @snaps   = map { backup_one($_, "$r->{prefix}-" . $_->name, $r->{source}, $r->{size}) }
            @servers;
        # a backup is done once its snapshot is: wait for all of them at the end, as a
        # caller of the module would (the cheapest order for it)
        $ec2->wait_for_snapshots(@snaps);
        my $s = time - $t;
        for my $snap (@snaps) {
            my $status = $snap->current_status;
            die "snapshot $snap is $status\n" unless $status eq 'completed';
        }
        return { seconds => $s, snapshots => [ map {"$_"} @snaps ] };
    },
});
