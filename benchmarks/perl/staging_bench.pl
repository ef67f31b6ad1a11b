#!/usr/bin/perl
# Driver of the Perl baseline (benchmarks/bench_perl.py): the original VM::EC2::Staging
# (Debian's libvm-ec2-perl) doing the benchmark's jobs, step by step, on request.
#
# Reads one JSON request per line on stdin, answers one JSON line on stdout:
#   {"op": "fleet", "names": ["a", "b"]}          -> get_server(-name => ...) each, in turn
#   {"op": "commands", "server": "w", "n": 100}   -> n x $server->scmd('echo ok')
#   {"op": "volume", "server": "w", "name": "v", "size": 1, "fstype": "ext4"}  (set-up)
#   {"op": "ssh", "server": "w", "command": "..."}            (set-up: a shell command)
#   {"op": "put", "source": "/local/dir/", "volume": "v"}     -> $manager->rsync(src, "$vol/")
#   {"op": "rsync", "from": "v1", "to": "v2"}                  -> $manager->rsync("$v1/", "$v2/")
#   {"op": "unmount", "volume": "v"}                           (set-up: $vol->unmount)
#   {"op": "dd", "from": "v1", "to": "v2"}                     -> $manager->dd($v1 => $v2)
#   {"op": "terminate", "names": ["a"]}                        (clean-up)
#   {"op": "quit"}
# Answer: {"ok": true, "seconds": <wall time of the timed part>, ...} or
#         {"ok": false, "error": "<what VM::EC2 said>"}.
# Arguments, environment and the request loop: BenchDriver.pm.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use Time::HiRes qw(time);
use BenchDriver qw(start serve server_named);

my ($ec2, $manager) = start(@ARGV);
my %volumes;   # name -> VM::EC2::Staging::Volume

sub volume_named {
    my $name = shift;
    return $volumes{$name} || die "no volume named $name\n";
}

sub timed {
    my $code = shift;
    my $t    = time;
    my $ok   = $code->();
    my $s    = time - $t;
    die "the step returned false\n" unless $ok;
    return { seconds => $s };
}

my %ops = (
    fleet => sub {
        my $r = shift;
        return timed(sub { server_named($_) for @{ $r->{names} }; 1 });
    },
    commands => sub {
        my $r      = shift;
        my $server = server_named($r->{server});
        return timed(sub {
            for (1 .. $r->{n}) {
                my $answer = $server->scmd('echo ok');
                die "scmd gave '$answer'\n" unless $answer eq "ok\n";
            }
            1;
        });
    },
    volume => sub {
        my $r      = shift;
        my $server = server_named($r->{server});
        my $vol    = $server->provision_volume(
            -name => $r->{name}, -size => $r->{size}, -fstype => $r->{fstype} || 'ext4');
        $volumes{ $r->{name} } = $vol;
        return { volume_id => "$vol", mtpt => $vol->mtpt, mtdev => $vol->mtdev };
    },
    put => sub {
        my $r   = shift;
        my $vol = volume_named($r->{volume});
        return timed(sub { $manager->rsync($r->{source}, "$vol/") });
    },
    rsync => sub {
        my $r = shift;
        my ($from, $to) = (volume_named($r->{from}), volume_named($r->{to}));
        return timed(sub { $manager->rsync("$from/", "$to/") });
    },
    unmount => sub {
        my $r = shift;
        volume_named($r->{volume})->unmount;
        return {};
    },
    dd => sub {
        my $r = shift;
        my ($from, $to) = (volume_named($r->{from}), volume_named($r->{to}));
        return timed(sub { $manager->dd($from => $to) });
    },
);

serve(\%ops);
